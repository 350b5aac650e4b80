"""One writer per directory: an exclusive lock file that names its holder.

    lock = acquire_lock(Path("runs/x/train.lock"), holder="trainer", harm="...")
    ...
    lock.release()

Used by `xdlm train` (`RUN_DIR/train.lock`, `xdlm.train.rundir`) and `xdlm prepare`
(`.OUT.lock` beside the output directory, `xdlm.data.prepare`). The lock is an exclusive `flock`
on the file, which the kernel drops when its holder dies (`kill -9` included), so a lock left by
a dead process is stale by construction and the next one takes it over. The file stays,
empty, after a release. Its content names the holder (pid, host, time) for the error message.
On a file system without `flock` (some network mounts) the content decides: a lock naming a live
process is held, one naming a dead pid on this host is stale, one from another host is held
(delete the file when that process is known to be gone); `wait` is not possible there.
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

_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


class DirLockedError(BlockingIOError):
    """Another live process holds the lock (an OSError: the CLI prints its one line)."""


@dataclass
class DirLock:
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

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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


def _is_us(owner: dict) -> bool:
    """Whether `owner` names this process: the same pid on the same host."""
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def _describe(owner: dict | None) -> str:
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on host {owner.get('host')!r} (since {owner.get('since')})"


def acquire_lock(path: Path, guards: Path, holder: str, harm: str, wait: bool = False) -> DirLock:
    """Take the lock file `path` (which guards the directory `guards`) for this process, taking
    over a stale one. Held by a live process: `DirLockedError` ("GUARDS is in use by another
    {holder}: ... {harm}; ..."), or with `wait` a message and a blocking wait for its release."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in _HELD and wait:
            print(f"waiting for {_describe(_read_owner(path))}, which holds {path}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        elif err.errno in _HELD:
            os.close(fd)
            raise _locked_error(path, guards, _read_owner(path), holder, harm) from None
        elif err.errno not in _NO_FLOCK:
            os.close(fd)
            raise
        else:  # no flock here: fall back to the pid in the file
            previous = _read_owner(path)
            if previous and _alive_here(previous) and not _is_us(previous):
                os.close(fd)
                raise _locked_error(path, guards, previous, holder, harm) from None
    previous = _read_owner(path)
    if previous and previous.get("pid") is not None and not _is_us(previous):
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
    return DirLock(path, fd, owner)


def _locked_error(
    path: Path, guards: Path, owner: dict | None, holder: str, harm: str
) -> DirLockedError:
    return DirLockedError(
        f"{guards} is in use by another {holder}: {_describe(owner)} holds {path}. {harm}; "
        "wait for it to finish, stop it, or choose another --out"
    )
