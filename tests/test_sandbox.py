"""The code-execution sandbox (pass@k): statuses, the unforgeable verdict, and every escape of
issue 17 tried from inside it (bounded: loopback and temp dirs only, seconds each). The escape
tests need bubblewrap (`apt-get install bubblewrap`, done by .ci/run) and skip without it."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import textwrap
import time
import uuid

import pytest

from xdlm.eval import sandbox
from xdlm.eval.sandbox import SandboxUnavailableError, pass_at_k, run_sandboxed


def _bwrap_reason() -> str | None:
    as_user = 65534 if os.geteuid() == 0 else None
    try:
        sandbox._check_bwrap(sandbox._interpreter(None, as_user), as_user)
    except SandboxUnavailableError as err:
        return str(err)
    return None


_NO_BWRAP = _bwrap_reason()
needs_bwrap = pytest.mark.skipif(_NO_BWRAP is not None, reason=f"no isolation: {_NO_BWRAP}")
ISOLATIONS = [pytest.param("bwrap", marks=needs_bwrap), "none"]


def run(code: str, **kw):
    kw = {"timeout_s": 5.0, "memory_mb": 256, **kw}
    return run_sandboxed(textwrap.dedent(code), **kw)


def report(result) -> dict:
    """The JSON object a probe printed as the last line of its stderr."""
    return json.loads(result.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("def f(x):\n    return x + 1\nassert f(1) == 2\n", "passed"),
        ("def f(x):\n    return x\nassert f(1) == 2\n", "failed"),
        ("while True:\n    pass\n", "timeout"),
        ("x = bytearray(8 * 1024**3)\n", "memory"),
        ("import os\nos._exit(0)\nassert False\n", "failed"),
        ("import sys\nsys.exit(0)\nassert False\n", "failed"),
        ("import sys\nprint('MemoryError', file=sys.stderr)\nraise SystemExit(1)\n", "failed"),
        ("import os\nfor fd in range(64):\n    try:\n        os.write(fd, b'0' * 32 + b' passed')"
         "\n    except OSError:\n        pass\nos._exit(0)\n", "failed"),
    ],
    ids=["pass", "fail", "infinite-loop", "memory-hog", "early-os-exit", "early-sys-exit",
         "forged-memoryerror", "forged-verdict"],
)  # fmt: skip
def test_status_and_unforgeable_verdict(code, status, isolation):
    result = run(code, timeout_s=1.0, isolation=isolation)
    assert result.status == status and result.passed == (status == "passed")


def test_refuses_without_isolation(monkeypatch):
    sandbox._check_bwrap.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, **kw: None)
    monkeypatch.setattr(sandbox, "_interpreter", lambda python, as_user: "/usr/bin/python3")
    try:
        with pytest.raises(SandboxUnavailableError, match="bubblewrap.*isolation='none'"):
            run_sandboxed("pass")
    finally:
        sandbox._check_bwrap.cache_clear()
    with pytest.raises(ValueError, match="unknown isolation 'docker'"):
        run_sandboxed("pass", isolation="docker")


@needs_bwrap
def test_no_write_outside_the_temp_dir(tmp_path):
    host_tmp = os.path.join(tempfile.gettempdir(), f"xdlm_escape_{uuid.uuid4().hex}")
    probe = f"""
        import json, sys
        out = {{}}
        for name, path in [("host_tmp", {host_tmp!r}), ("pytest_tmp", {str(tmp_path / "x")!r}),
                           ("usr", "/usr/xdlm_escape"), ("root", "/xdlm_escape"),
                           ("dev", "/dev/xdlm_escape"), ("dev_shm", "/dev/shm/xdlm_escape"),
                           ("cwd", "inside.txt"), ("tmp", "/tmp/inside.txt")]:
            try:
                open(path, "w").write("x")
                out[name] = "written"
            except OSError as err:
                out[name] = type(err).__name__
        print(json.dumps(out), file=sys.stderr)
    """
    got = report(run(probe))
    assert got["cwd"] == got["tmp"] == "written"  # the one writable (size-limited) tmpfs
    assert {got[k] for k in ("usr", "root", "dev", "dev_shm")} == {"OSError"}  # read-only
    assert not os.path.exists(host_tmp) and not (tmp_path / "x").exists()


@needs_bwrap
def test_no_reading_host_files():
    this_file = os.path.abspath(__file__)
    probe = f"""
        import json, os, sys
        out = {{}}
        for name, path in [("repo", {this_file!r}), ("root", "/root"), ("etc", "/etc/passwd")]:
            try:
                os.listdir(path) if name == "root" else open(path).read()
                out[name] = "read"
            except OSError as err:
                out[name] = type(err).__name__
        print(json.dumps(out), file=sys.stderr)
    """
    assert set(report(run(probe)).values()) <= {"FileNotFoundError", "PermissionError"}


@needs_bwrap
def test_no_network_to_a_loopback_listener():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    probe = f"""
        import json, socket, sys
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"escaped")
            out = "sent"
        except OSError as err:
            out = type(err).__name__
        print(json.dumps({{"connect": out}}), file=sys.stderr)
    """
    got = report(run(probe))
    listener.settimeout(0.5)
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()
    assert got["connect"] != "sent"


@needs_bwrap
def test_environment_and_processes_of_the_host_are_invisible():
    probe = """
        import json, os, sys
        names, pids = set(os.environ), [p for p in os.listdir("/proc") if p.isdigit()]
        for pid in [str(os.getppid()), *pids]:
            try:
                raw = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            names |= {kv.split(b"=", 1)[0].decode() for kv in raw.split(b"\\0") if kv}
        print(json.dumps({"names": sorted(names), "pids": len(pids),
                          "path": os.environ["PATH"]}), file=sys.stderr)
    """
    got = report(run(probe))
    # Nothing of the caller's environment: only what the sandbox sets (PWD by bwrap --chdir,
    # LC_CTYPE by Python's own locale coercion).
    assert set(got["names"]) <= {"PATH", "HOME", "PWD", "LC_CTYPE"}
    assert got["path"] == "/usr/bin:/bin"
    assert got["pids"] <= 3  # its own PID namespace: bwrap's init, the harness, (listdir)


@needs_bwrap
def test_fork_bomb_is_bounded():
    probe = """
        import json, os, sys, time
        forked = 0
        for _ in range(300):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            forked += 1
        print(json.dumps({"forked": forked}), file=sys.stderr)
    """
    start = time.monotonic()
    result = run(probe, max_procs=16, memory_mb=17 * 32)
    assert report(result)["forked"] == 16  # exactly max_procs: counted in its user namespace
    assert time.monotonic() - start < 20  # the sleeping children did not hold the run open


@needs_bwrap
@pytest.mark.parametrize("how", ["setsid", "double-fork", "on-timeout"])
def test_no_process_survives_the_run(how):
    token = f"xdlm-survivor-{uuid.uuid4().hex}"
    spawn = f"""
        import os, subprocess, sys, time
        cmd = [sys.executable, "-c", "import time; time.sleep(60)", {token!r}]
        if {how!r} == "double-fork":
            if os.fork() == 0:
                subprocess.Popen(cmd)
                os._exit(0)
        else:
            subprocess.Popen(cmd, start_new_session=True)
        time.sleep(0.5)
        if {how!r} == "on-timeout":
            time.sleep(60)
    """
    result = run(spawn, timeout_s=2.0)
    assert result.status == ("timeout" if how == "on-timeout" else "passed")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _processes_with(token):
        time.sleep(0.1)
    assert not _processes_with(token)


def _processes_with(token: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if token.encode() in fh.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def test_pass_at_k():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
