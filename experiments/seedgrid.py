"""Shared by the seed-grid experiments (knownlaw, chartext): k × seed models, resumable training,
and single-thread worker processes that split the grid.

Imported by `experiments/<name>/run.py` after it puts this folder on `sys.path`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from argparse import SUPPRESS, ArgumentParser, Namespace
from collections.abc import Callable
from pathlib import Path

import torch

from xdlm.config import XDLMConfig
from xdlm.train.loop import train

REPO = Path(__file__).resolve().parents[1]


def models(settings: dict) -> list[tuple[float, int]]:
    """(k, seed) in training order: every k of seed 0 first, so a partial run has whole seeds."""
    return [(float(k), int(s)) for s in settings["seeds"] for k in settings["ks"]]


def train_model(cfg: XDLMConfig, run_dir: Path) -> dict:
    """Train (or resume) one model; its train_info.json (wall time, tokens/s, final valid)."""
    info_path = run_dir / "train_info.json"
    if not info_path.is_file():
        start = time.perf_counter()
        result = train(cfg, run_dir, resume=(run_dir / "checkpoints" / "latest").is_file())
        if result.interrupted or result.step < cfg.train.steps:
            raise RuntimeError(f"training of {run_dir} stopped at step {result.step}")
        info = {"k": cfg.kernel.k, "seed": cfg.train.seed, "step": result.step,
                "wall_s": time.perf_counter() - start, "tokens_per_s": result.tokens_per_s,
                "threads": torch.get_num_threads(), "final_valid": result.valid}  # fmt: skip
        info_path.write_text(json.dumps(info, indent=1))
    return json.loads(info_path.read_text())


def spawn_workers(script: str, args, n: int) -> None:
    """Run `n` single-thread processes of `script` (its train + eval stages, worker i of n each)
    with the same --budget / --out, and wait for all of them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    stages = ",".join(s for s in args.stages.split(",") if s in ("train", "eval"))
    common = [sys.executable, script, "--budget", args.budget, "--out", str(args.out)]
    procs = [
        subprocess.Popen([*common, "--stages", stages, "--worker", f"{i}/{n}"], env=env)
        for i in range(n)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"a worker failed (exit codes {codes}); rerun to resume")


def parse_args(
    argv: list[str] | None, doc: str, name: str, budget: str, stages: tuple
) -> Namespace:
    """The shared command line of `experiments/<name>/run.py`; args.out defaults to
    runs/<name>/<budget>, and args.stage_list holds the checked stages."""
    parser = ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--budget", default=budget)
    parser.add_argument("--out", default=None, help=f"work dir (default runs/{name}/<budget>)")
    parser.add_argument("--stages", default=",".join(stages), help="comma-separated subset")
    parser.add_argument("--jobs", type=int, default=1, help="single-thread worker processes")
    parser.add_argument("--worker", default=None, help=SUPPRESS)  # "i/n", internal
    parser.add_argument("--machine", default="2 shared CPU cores")
    parser.add_argument("--publish", default=str(REPO), help="root for results/ and docs/")
    args = parser.parse_args(argv)
    args.stage_list = args.stages.split(",")
    if bad := sorted(set(args.stage_list) - set(stages)):
        raise ValueError(f"unknown stage(s) {bad}; choose from {stages}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    args.out = Path(args.out or REPO / "runs" / name / args.budget)
    return args


def finished_models(settings: dict, out: Path, run_name: Callable[[float, int], str]) -> dict:
    """{run name: {k, seed, train: train_info.json, **eval.json}} of every evaluated model."""
    done = {}
    for k, seed in models(settings):
        run_dir = out / "runs" / run_name(k, seed)
        if (run_dir / "eval.json").is_file():
            info = json.loads((run_dir / "train_info.json").read_text())
            evaluation = json.loads((run_dir / "eval.json").read_text())
            done[run_name(k, seed)] = {"k": k, "seed": seed, "train": info, **evaluation}
    return done


def within_bound(ci: dict, bound: float) -> str:
    """ "yes" if the whole interval ci = {lo, hi} is at most `bound`, "no" if it is all above,
    else "undecided"."""
    return "yes" if ci["hi"] <= bound else ("no" if ci["lo"] > bound else "undecided")


def write_results_section(doc: Path, heading: str, section: str) -> None:
    """Put `section` (starting with the `## heading` line) in place of the old one in `doc`
    (up to the next `## `), or append it."""
    text = doc.read_text() if doc.is_file() else "# Results\n"
    own = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text, replaced = own.subn(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    if not replaced:
        text = text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")
