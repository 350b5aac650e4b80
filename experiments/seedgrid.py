"""Shared by the seed-grid experiments (knownlaw, chartext, digits): k × seed models, resumable
training, single-thread worker processes that split the grid, and the statistics over seeds.

Imported by `experiments/<name>/run.py` after it puts this folder on `sys.path`.
"""

from __future__ import annotations

import importlib
import importlib.util
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

from xdlm.config import XDLMConfig, merge
from xdlm.eval.seeds import paired_difference, t_interval
from xdlm.precision import cpu_description
from xdlm.train.loop import train

REPO = Path(__file__).resolve().parents[1]


def load_module(name: str, path: Path):
    """The Python file `path` executed as a module called `name`, not put in sys.modules: an
    experiment's run.py / report.py loaded by another experiment never shadows the `run` or
    `report` module a third one imports by name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def budget_grid(settings: dict, budget: str) -> dict:
    """`settings` with the budget's own `ks` / `seeds` (where it names them) in place of the
    top-level ones, so a later budget can widen the grid without changing earlier results."""
    spec = settings["budgets"].get(budget, {})
    return {**settings, **{key: spec[key] for key in ("ks", "seeds") if key in spec}}


def budget_spec(settings: dict, budget: str) -> dict:
    """The budget's block of the settings; ValueError naming the valid budgets."""
    if budget not in settings["budgets"]:
        raise ValueError(f"unknown budget {budget!r}; choose one of {sorted(settings['budgets'])}")
    return settings["budgets"][budget]


def model_config(settings: dict, budget: str, k: float, seed: int, data_dir: Path) -> XDLMConfig:
    """Base, then the budget's overrides, then k and the seed (the only changes between models;
    k = 1 is UDLM without a mask state, kernel.use_mask = false)."""
    cfg = merge(merge(XDLMConfig(), settings["base"]), budget_spec(settings, budget)["config"])
    kernel = {"k": float(k), "use_mask": k != 1.0}
    data = {"path": str(data_dir), "sources": []}
    return merge(cfg, {"kernel": kernel, "data": data, "train": {"seed": int(seed)}})


def run_name(k: float, seed: int) -> str:
    """k0-s0, k0.1-s2, k1-nomask-s1, ..."""
    return f"k{k:g}" + ("-nomask" if k == 1.0 else "") + f"-s{seed}"


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
    """Run `n` single-thread processes of `script` (worker i of n each: every stage but data and
    report) with the same --budget / --out, and wait for all of them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    stages = ",".join(s for s in args.stages.split(",") if s not in ("data", "report"))
    common = [sys.executable, script, "--budget", args.budget, "--out", str(args.out)]
    procs = [
        subprocess.Popen([*common, "--stages", stages, "--worker", f"{i}/{n}"], env=env)
        for i in range(n)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"a worker failed (exit codes {codes}); rerun to resume")


def run_stages(
    script: str, args: Namespace, settings: dict, prepare: Callable[[], object],
    work: Callable, collect: Callable[[], dict], report_module: str = "report",
) -> int:  # fmt: skip
    """The main of an experiment's script (experiments/<name>/run.py or a sibling) once its
    arguments are parsed. A worker (`--worker i/n`) trains and evaluates its share
    single-threaded; otherwise `prepare()`, the train and eval stages (`work` here, or in
    args.jobs worker processes of `script`), then the report: `collect()` with the budget,
    machine and CPU, passed to `<report_module>.report` beside the script."""
    stages = args.stage_list
    if args.worker is not None:
        torch.set_num_threads(1)
        i, n = (int(v) for v in args.worker.split("/"))
        work(settings, args.budget, args.out, stages, (i, n))
        return 0
    start = time.perf_counter()
    prepare()
    print(f"data ready in {args.out} ({time.perf_counter() - start:.0f} s)", flush=True)
    if set(stages) - {"data", "report"}:
        if args.jobs > 1:
            spawn_workers(script, args, args.jobs)
        else:
            work(settings, args.budget, args.out, stages, (0, 1))
    if "report" in stages:
        where = Path(script)
        command = f"python experiments/{where.parent.name}/{where.name} --budget {args.budget}"
        command += f" --jobs {args.jobs}" if args.jobs > 1 else ""
        results = collect()
        results.update(budget=args.budget, machine=args.machine, cpu=cpu_description())
        report = importlib.import_module(report_module).report  # matplotlib only then
        report(results, settings, args.budget, command, Path(args.publish))
    return 0


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


def finished_models(settings: dict, out: Path) -> dict:
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


def seed_summary(table: dict[float, dict[int, dict[str, float]]], ratio_of: str) -> dict:
    """Statistics over seeds of table = {k: {seed: {metric: value}}}, keyed by f"{k:g}".

    Per k: its seeds, every metric's values (seed order), 95 % t-intervals (None under two
    seeds) and, against k = 0 on the seeds both have, the paired difference of every metric and
    the t-interval of metric_k / metric_0 − 1 for `ratio_of` (as f"{ratio_of}_ratio_vs_k0").
    """
    base, out = table.get(0.0, {}), {}
    for k, seeds in sorted(table.items()):
        names = sorted(set.intersection(*(set(v) for v in seeds.values())))
        values = {n: [seeds[s][n] for s in sorted(seeds)] for n in names}
        row = {"seeds": sorted(seeds), "values": values,
               "ci": {n: t_interval(v).to_dict() if len(v) > 1 else None
                      for n, v in values.items()}}  # fmt: skip
        shared = sorted(set(seeds) & set(base))
        if k != 0.0 and len(shared) >= 2:
            row["paired_vs_k0"] = {
                n: paired_difference([seeds[s][n] for s in shared],
                                     [base[s][n] for s in shared]).to_dict()
                for n in names if all(n in base[s] for s in shared)
            }  # fmt: skip
            ratio = [seeds[s][ratio_of] / base[s][ratio_of] - 1.0 for s in shared]
            row[f"{ratio_of}_ratio_vs_k0"] = t_interval(ratio).to_dict()
        out[f"{k:g}"] = row
    return out


def fmt_ci(ci: dict | None, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """ "mean [lo, hi]unit" of an interval dict scaled by `scale`; "–" for None."""
    if ci is None:
        return "–"
    m, lo, hi = (ci[x] * scale for x in ("mean", "lo", "hi"))
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]{unit}"


def mean_train_wall(results: dict) -> dict[str, float]:
    """Mean training wall seconds per k (keyed f"{k:g}") of results["models"]."""
    out: dict[str, list[float]] = {}
    for m in results["models"].values():
        out.setdefault(f"{float(m['k']):g}", []).append(m["train"]["wall_s"])
    return {k: sum(v) / len(v) for k, v in out.items()}
