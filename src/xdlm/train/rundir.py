"""Run-directory housekeeping: one trainer per run directory (`RUN_DIR/train.lock`), and
`metrics.jsonl` trimmed to the step a resume restarts from (`trim_metrics`).

    lock = acquire_run_lock("runs/quickstart")   # RunLockedError if another trainer holds it
    ...
    lock.release()

The lock (`xdlm.dirlock`, shared with `xdlm prepare`) is an exclusive `flock` on the file, which
the kernel drops when its holder dies (`kill -9` included), so a lock left by a dead trainer is
stale by construction and the next trainer takes it over; its content names the holder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from xdlm.dirlock import DirLock, DirLockedError, acquire_lock

LOCK_FILE = "train.lock"
RunLockedError = DirLockedError  # the name trainers' callers know


def acquire_run_lock(run_dir: str | Path) -> DirLock:
    """Take `run_dir/train.lock` for this process, taking over a stale one (`xdlm.dirlock`)."""
    run_dir = Path(run_dir)
    return acquire_lock(
        run_dir / LOCK_FILE,
        guards=run_dir,
        holder="trainer",
        harm="Two trainers on one --out corrupt each other's checkpoints",
    )


def trim_metrics(path: Path, step: int) -> None:
    """Drop the lines of `metrics.jsonl` after `step` (logged after the checkpoint a resume
    restarts from, and logged again by it) and torn lines; atomic (tmp + os.replace)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
