"""`xdlm prepare` against races, dead parents and full disks (issue 28.2, 28.3, 28.5): one
writer per --out (a lock naming its holder; trainers sharing an unprepared data.path wait for
the first), tokenizer workers that die with their parent, a one-line message for a full disk
and an exact resume after it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from run_fixtures import fill_disk

from xdlm import dirlock
from xdlm.cli import main

_HOLD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("dirlock", sys.argv[1])  # stdlib only: fast
dirlock = sys.modules["dirlock"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dirlock)
from pathlib import Path
lock = dirlock.acquire_lock(Path(sys.argv[2]), guards=Path(sys.argv[3]), holder="x", harm="x")
print("locked", flush=True)
sys.stdin.readline()  # hold until told
"""


@pytest.fixture
def prepare_lock_holder(tmp_path):
    """A second process holding the prepare lock of `tmp_path / "data"`; released on a line."""
    out = tmp_path / "data"
    args = [sys.executable, "-c", _HOLD, dirlock.__file__, str(tmp_path / ".data.lock"), str(out)]
    with subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:  # (leaving the `with` closes the pipes)
            assert proc.stdout.readline().strip() == "locked"
            yield proc
        finally:
            proc.kill()
            proc.wait(timeout=30)


def _argv(corpus, out, *extra):
    return ["prepare", str(corpus), "--out", str(out), "--tokenizer", "char", "--seq-len", "32",
            "--no-progress", *extra]  # fmt: skip


def test_second_prepare_on_one_out_is_refused_naming_the_holder(
    tiny_corpus, tmp_path, prepare_lock_holder, capsys
):
    """Regression: two concurrent preparations of one --out crashed one of them and once
    left a manifest whose sha256 did not match its shards."""
    assert main(_argv(tiny_corpus, tmp_path / "data")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data'} is in use by another xdlm prepare: pid " in err
    assert str(prepare_lock_holder.pid) in err
    harm = ". Two preparations of one --out mix their shards; wait for it to finish, stop it, or "
    assert harm + "choose another --out\n" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / ".data.partial").exists()
    prepare_lock_holder.kill()  # a dead holder's lock is stale: taken over
    prepare_lock_holder.wait(timeout=30)
    assert main(_argv(tiny_corpus, tmp_path / "data", "--verify")) == 0


def test_a_trainer_waits_for_the_preparation_of_its_data_path(
    tiny_corpus, tiny_run, tmp_path, prepare_lock_holder, capsys
):
    """Two trainers on one unprepared data.path: the second waits for the first's preparation
    and then uses it (here the first is the lock holder, which "prepares" by copying)."""
    from run_fixtures import tiny_cfg

    from xdlm.builders import ensure_dataset

    cfg = tiny_cfg(tiny_corpus, tmp_path / "data")
    result = {}
    waiter = threading.Thread(target=lambda: result.update(m=ensure_dataset(cfg.data)))
    waiter.start()
    out, deadline = "", time.monotonic() + 60
    while "waiting for pid" not in out and time.monotonic() < deadline:
        time.sleep(0.05)
        out += capsys.readouterr().out
    assert f"waiting for pid {prepare_lock_holder.pid}" in out
    assert waiter.is_alive() and not (tmp_path / "data").exists()
    shutil.copytree(tiny_run / "data", tmp_path / "data")  # the first trainer's result
    prepare_lock_holder.stdin.write("done\n")
    prepare_lock_holder.stdin.flush()
    waiter.join(timeout=60)
    assert result["m"].seq_len == 32 and not (tmp_path / ".data.partial").exists()


_ORPHANS = """
import os, sys, time
from xdlm.data import encoding
from xdlm.cli import main
parent = os.getpid()
real = encoding.encode_texts
def slow(tok, texts):  # workers (forked) block here; the parent waits for them
    if os.getpid() != parent:
        time.sleep(600)
    return real(tok, texts)
encoding.encode_texts = slow
main(sys.argv[1:])
"""


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [int(x) for x in fh.read().split()]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_prepare_leaves_no_worker_behind(tiny_corpus, tmp_path):
    """Regression: `kill -9` of `prepare --num-proc 2` orphaned both workers (still running
    minutes later). They now get SIGKILL from the kernel when their parent dies."""
    argv = _argv(tiny_corpus, tmp_path / "data", "--num-proc", "2")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_ORPHANS), *argv])
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            workers = _children(proc.pid)
        assert len(workers) == 2, f"prepare did not start 2 workers (exit {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _running(w)], "workers outlived their parent"
    finally:
        proc.kill()
        for w in [w for w in workers if _running(w)]:  # only when the test failed
            os.kill(w, signal.SIGKILL)


def test_full_disk_during_prepare_is_one_line_and_resumes_to_the_same_bytes(
    tiny_corpus, tmp_path, small_fs, capsys
):
    """A real full file system while the shards are written (Python's OSError ENOSPC): one
    line, the work directory keeps its checkpoint, and the same command after freeing space
    gives the bytes of an unconstrained run."""
    assert main(_argv(tiny_corpus, tmp_path / "reference")) == 0
    fill_disk(small_fs, 40 * 1024)  # room for the tokenizer, not for ~120 KB of shards
    capsys.readouterr()
    assert main(_argv(tiny_corpus, small_fs / "data")) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert (
        len(err) == 1
        and f"preparing {small_fs / 'data'} failed: no space left on device" in (err[0])
    )
    assert "run the same command again: it continues from its last checkpoint" in err[0]
    assert not (small_fs / "data").exists() and (small_fs / ".data.partial").is_dir()
    (small_fs / "filler").unlink()
    assert main(_argv(tiny_corpus, small_fs / "data")) == 0
    reference = tmp_path / "reference"
    for path in sorted(p for p in reference.rglob("*") if p.is_file()):
        rel = path.relative_to(reference)
        assert (small_fs / "data" / rel).read_bytes() == path.read_bytes(), rel
