"""Run-directory housekeeping: one trainer per run directory (`RUN_DIR/train.lock`), and
`metrics.jsonl` trimmed to the step a resume restarts from (`trim_metrics`).

    lock = acquire_run_lock("runs/quickstart")   # RunLockedError if another trainer holds it
    ...
    lock.release()

The lock is an exclusive `flock` on the file, which the kernel drops when its holder dies
(`kill -9` included), so a lock left by a dead trainer is stale by construction and the next
trainer takes it over. The file stays after a run, empty. Its content names the holder (pid,
host, time) for the error message. On a file system without `flock` (some network mounts) the
content decides: a lock naming a live process is held, one naming a dead pid on this host is
stale, one from another host is held (delete the file when that trainer is known to be gone).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "train.lock"


class RunLockedError(RuntimeError):
    """Another live trainer holds the run directory."""


@dataclass
class RunLock:
    """A held lock: the open file (holding the flock) and what it says about us."""

    path: Path
    fd: int | None
    owner: dict

    def release(self) -> None:
        """Empty the file and drop the lock (idempotent). The file stays: unlinking it would
        let a waiting opener lock the old inode while a newcomer locks a new one."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _read_owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _alive_here(owner: dict) -> bool:
    """Whether the process `owner` names still runs (unknown host: assume it does)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked_error(path: Path, owner: dict | None) -> RunLockedError:
    who = (
        f"pid {owner.get('pid')} on host {owner.get('host')!r} (since {owner.get('since')})"
        if owner
        else "another process"
    )
    return RunLockedError(
        f"{path.parent} is in use by another trainer: {who} holds {path}. Two trainers on one "
        "--out corrupt each other's checkpoints; wait for it to finish, stop it, or choose "
        "another --out"
    )


def acquire_run_lock(run_dir: str | Path) -> RunLock:
    """Take `run_dir/train.lock` for this process, taking over a stale one."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise _locked_error(path, _read_owner(path)) from None
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            raise
        previous = _read_owner(path)  # no flock here: fall back to the pid in the file
        if previous and _alive_here(previous) and previous.get("pid") != os.getpid():
            os.close(fd)
            raise _locked_error(path, previous) from None
    previous = _read_owner(path)
    if previous and previous.get("pid") not in (None, os.getpid()):
        print(
            f"taking over the stale lock {path} of pid {previous.get('pid')} on "
            f"{previous.get('host')!r} (no longer running)"
        )
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd, owner)


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
