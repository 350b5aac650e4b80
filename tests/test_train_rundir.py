"""The run lock's take-over rules where `flock` is unsupported (some network mounts), and the
metrics trim at its boundary (issue 29). The flock path itself: test_integrity.py."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

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
