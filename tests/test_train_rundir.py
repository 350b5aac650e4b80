"""The run lock's take-over rules where `flock` is unsupported (some network mounts), and the
metrics trim at its boundary, and the flock path in-process: a second taker, `wait`, the exact
messages (issue 29). The flock path between processes: test_integrity.py."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest

from xdlm.train.rundir import RunLockedError, acquire_run_lock, trim_metrics


@pytest.fixture
def no_flock(monkeypatch):
    def flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.fixture(scope="module")
def dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def _lock_file(run, pid, host):
    run.mkdir()
    (run / "train.lock").write_text(json.dumps({"pid": pid, "host": host, "since": "then"}))


@pytest.mark.parametrize("pid", ["dead", "ours"])
def test_a_holder_on_another_host_is_never_taken_over_by_pid(tmp_path, no_flock, dead_pid, pid):
    """A pid from another host says nothing about a process here: not dead because no such pid
    runs here, not us because our pid has the same number."""
    pid = dead_pid if pid == "dead" else os.getpid()
    _lock_file(tmp_path / "run", pid, "node-b.cluster")
    with pytest.raises(RunLockedError, match=f"pid {pid} on host 'node-b.cluster'"):
        acquire_run_lock(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "train.lock").read_text())["host"] == "node-b.cluster"


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, no_flock, dead_pid, capsys):
    _lock_file(tmp_path / "run", dead_pid, socket.gethostname())
    lock = acquire_run_lock(tmp_path / "run")
    assert f"stale lock {tmp_path / 'run' / 'train.lock'} of pid {dead_pid}" in (
        capsys.readouterr().out
    )
    assert lock.owner["pid"] == os.getpid() and lock.owner["host"] == socket.gethostname()
    assert json.loads((tmp_path / "run" / "train.lock").read_text()) == lock.owner
    lock.release()
    assert (tmp_path / "run" / "train.lock").read_text() == ""


def test_our_own_lock_file_is_retaken_silently(tmp_path, no_flock, capsys):
    """A file naming this very process (same pid, same host): a second acquire in-process."""
    _lock_file(tmp_path / "run", os.getpid(), socket.gethostname())
    acquire_run_lock(tmp_path / "run").release()
    assert "stale" not in capsys.readouterr().out


def test_trim_metrics_keeps_the_resume_step_and_drops_the_next(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    path.write_text("\n".join([lines[0], "not json", json.dumps([4]), lines[1], lines[2]]) + "\n")
    trim_metrics(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    trim_metrics(tmp_path / "missing.jsonl", 2)  # no file: nothing to trim, nothing created
    assert not (tmp_path / "missing.jsonl").exists()


def test_trim_metrics_keeps_records_without_a_step_at_step_zero(tmp_path):
    """A record without "step" counts as step 0: kept by a resume from the start."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start"}\n{"step": 1}\n')
    trim_metrics(path, 0)
    assert path.read_text() == '{"event": "start"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ------------------------------------------------------------------ the flock path, in-process
def _message(run, owner: str) -> str:
    return (
        f"{run} is in use by another trainer: {owner} holds {run / 'train.lock'}. Two trainers "
        "on one --out corrupt each other's checkpoints; wait for it to finish, stop it, or "
        "choose another --out"
    )


def test_a_held_lock_refuses_a_second_taker_naming_the_holder(tmp_path):
    """flock locks an open file: a second open in this same process conflicts like another
    process would. The new file is created -rw-r--r-- in a new nested directory."""
    old_umask = os.umask(0o022)
    try:
        run = tmp_path / "a" / "run"
        with acquire_run_lock(run) as lock:
            _check_held(run, lock)
    finally:
        os.umask(old_umask)
    assert lock.path.read_text() == "" and lock.fd is None
    lock.release()  # idempotent
    acquire_run_lock(run).release()  # released: taken again


def _check_held(run, lock):
    assert lock.path == run / "train.lock"
    assert (lock.path.stat().st_mode & 0o777) == 0o644
    assert sorted(lock.owner) == ["host", "pid", "since"]
    assert (lock.owner["pid"], lock.owner["host"]) == (os.getpid(), socket.gethostname())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", lock.owner["since"])
    assert lock.path.read_text() == json.dumps(lock.owner) + "\n"
    owner = f"pid {os.getpid()} on host {socket.gethostname()!r} (since {lock.owner['since']})"
    with pytest.raises(RunLockedError) as err:
        acquire_run_lock(run)
    assert str(err.value) == _message(run, owner)
    lock.path.write_text("")  # an unreadable / empty holder record
    with pytest.raises(RunLockedError) as err:
        acquire_run_lock(run)
    assert str(err.value) == _message(run, "another process")


class _Stdout(io.StringIO):
    """sys.stdout that remembers what had been flushed (what a reading process has seen)."""

    flushed = ""

    def flush(self) -> None:
        self.flushed = self.getvalue()


def test_wait_blocks_until_the_holder_releases(tmp_path, monkeypatch):
    """`wait`: a message naming the holder, flushed before the blocking flock, which returns
    once the holder (here released by another thread when the blocking call starts) lets go."""
    from xdlm.dirlock import acquire_lock

    path = tmp_path / "x.lock"
    first = acquire_lock(path, guards=tmp_path, holder="writer", harm="h")
    blocking, real, seen = threading.Event(), fcntl.flock, []
    out = _Stdout()
    monkeypatch.setattr(sys, "stdout", out)

    def flock(fd, op):
        if op == fcntl.LOCK_EX:
            seen.append(out.flushed)
            blocking.set()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    releaser = threading.Thread(target=lambda: (blocking.wait(30), first.release()))
    releaser.start()
    try:
        second = acquire_lock(path, guards=tmp_path, holder="writer", harm="h", wait=True)
    finally:
        blocking.set()
        releaser.join()
    (flushed,) = seen
    assert flushed.startswith(f"waiting for pid {os.getpid()} on host ")
    assert flushed.endswith(f"which holds {path}\n") and out.getvalue() == flushed
    assert json.loads(path.read_text()) == second.owner
    second.release()


def test_a_flock_failure_other_than_held_or_unsupported_is_raised(tmp_path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(OSError) as err:
        acquire_run_lock(tmp_path / "run")
    assert type(err.value) is OSError and err.value.errno == errno.EIO


def test_a_takeover_replaces_a_longer_record_whole(tmp_path, no_flock, dead_pid, capsys):
    run = tmp_path / "run"
    run.mkdir()
    record = {"pid": dead_pid, "host": socket.gethostname(), "since": "x" * 300}
    (run / "train.lock").write_text(json.dumps(record))
    lock = acquire_run_lock(run)
    assert capsys.readouterr().out == (
        f"taking over the stale lock {run / 'train.lock'} of pid {dead_pid} on "
        f"{socket.gethostname()!r} (no longer running)\n"
    )
    assert (run / "train.lock").read_text() == json.dumps(lock.owner) + "\n"
    lock.release()


def test_without_flock_a_fresh_directory_is_taken(tmp_path, no_flock, capsys):
    acquire_run_lock(tmp_path / "run").release()
    assert capsys.readouterr().out == ""


def test_without_flock_a_live_holder_here_is_refused_and_left_alone(tmp_path, no_flock):
    """Probing the holder (signal 0) must not disturb it: it still exits normally after (it
    restores the default action of SIGHUP, which `nohup` would have it inherit as ignored)."""
    code = (
        "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); print('ready', "
        "flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "ready\n"
        _lock_file(tmp_path / "run", holder.pid, socket.gethostname())
        with pytest.raises(RunLockedError) as err:
            acquire_run_lock(tmp_path / "run")
        owner = f"pid {holder.pid} on host {socket.gethostname()!r} (since then)"
        assert str(err.value) == _message(tmp_path / "run", owner)
    finally:
        holder.communicate(timeout=30)
    assert holder.returncode == 0


def test_without_flock_a_holder_we_may_not_signal_is_alive(tmp_path, no_flock, monkeypatch):
    """EPERM from kill(pid, 0): the pid runs under another user; the lock is held."""

    def kill(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    _lock_file(tmp_path / "run", 1, socket.gethostname())
    monkeypatch.setattr(os, "kill", kill)
    with pytest.raises(RunLockedError, match="pid 1 on host"):
        acquire_run_lock(tmp_path / "run")
