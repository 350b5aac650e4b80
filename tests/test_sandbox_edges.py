"""The sandbox's edges (issue 29): how `_run` judges a child from its exit status, verdict line
and stderr (exit codes, SIGXCPU, the 2,000-character tail, undecodable bytes, a wrong secret),
where and as whom the program runs, the argument limits exactly at and one past them, and the
interpreter lookup."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from test_sandbox import ISOLATIONS, needs_bwrap  # noqa: I001  (the shared skip markers)

from xdlm.eval import sandbox
from xdlm.eval.sandbox import pass_at_k, run_sandboxed

# A stand-in for the harness: reads the secret from stdin, writes `VERDICT` (formatted with the
# secret) to the verdict fd that `_run` appends as the last argument, then runs `BODY`.
_CHILD = """
import os, sys
secret = sys.stdin.readline().strip()
fd = int(sys.argv[-1])
os.write(fd, ({verdict!r}.format(secret=secret) + "\\n").encode())
os.close(fd)
{body}
"""


def _judge(body: str = "", verdict: str = "{secret} passed", cwd=None, timeout_s: float = 20.0):
    code = _CHILD.format(verdict=verdict, body=textwrap.dedent(body))
    return sandbox._run([sys.executable, "-c", code], cwd, None, timeout_s, ())


def test_a_clean_exit_with_the_verdict_passes_with_returncode_zero():
    assert _judge() == sandbox.SandboxResult("passed", 0, "")


@pytest.mark.parametrize("code", [3, 1])
def test_a_nonzero_exit_fails_with_its_code_and_stderr_even_with_the_verdict(code):
    result = _judge(f"sys.stderr.write('boom'); sys.exit({code})")
    assert result == sandbox.SandboxResult("failed", code, "boom")


def test_a_verdict_with_another_secret_or_none_fails():
    assert _judge(verdict="not-the-secret passed").status == "failed"
    assert _judge(verdict="").status == "failed"


def test_a_limit_verdict_wins_and_keeps_the_exit_status():
    result = _judge("sys.exit(5)", verdict="{secret} memory")
    assert result == sandbox.SandboxResult("memory", 5, "")


@pytest.mark.parametrize("how", ["signal", "exit"])
def test_sigxcpu_is_a_timeout_with_its_status(how):
    """The CPU-time limit ends the child with SIGXCPU (−24), or bwrap reports it as 128 + 24."""
    body = ("os.kill(os.getpid(), signal.SIGXCPU)" if how == "signal"
            else "sys.exit(128 + signal.SIGXCPU)")  # fmt: skip
    result = _judge("import signal\n" + body)
    expected = -signal.SIGXCPU if how == "signal" else 128 + signal.SIGXCPU
    assert result == sandbox.SandboxResult("timeout", expected, "")
    assert _judge("import signal\nsys.exit(127 + signal.SIGXCPU)").status == "failed"


def test_stderr_keeps_exactly_the_last_2000_characters_and_replaces_bad_bytes():
    result = _judge("sys.stderr.write('a' * 2500 + 'b' * 2000); sys.exit(1)")
    assert result.stderr == "b" * 2000
    result = _judge("sys.stderr.buffer.write(b'x\\xff' * 3); sys.exit(1)")
    assert result.stderr == "x\ufffd" * 3


def test_a_wall_timeout_has_no_status_and_no_stderr():
    result = _judge("import time; sys.stderr.write('late'); sys.stderr.flush(); time.sleep(60)",
                    timeout_s=1.0)  # fmt: skip
    assert result == sandbox.SandboxResult("timeout", None, "")


def test_the_child_runs_in_cwd_in_its_own_session_with_stdout_discarded(tmp_path, capfd):
    body = f"""
    assert os.getcwd() == {str(tmp_path)!r}
    assert os.getsid(0) == os.getpid()
    print("SHOULD-NOT-APPEAR")
    """
    assert _judge(body, cwd=str(tmp_path)).status == "passed"
    assert "SHOULD-NOT-APPEAR" not in capfd.readouterr().out


def _runs_with(interpreter: str) -> str:
    return f"""
    import os, sys
    assert os.path.isfile(os.path.join(os.getcwd(), "candidate.py"))
    assert os.geteuid() == {os.geteuid()}
    assert os.path.realpath(sys.executable) == {interpreter!r}, sys.executable
    """


def test_without_isolation_the_program_runs_in_its_workdir_as_the_caller_with_its_python():
    mine = _runs_with(os.path.realpath(sys.executable))
    assert run_sandboxed(textwrap.dedent(mine), 10.0, 256, isolation="none").status == "passed"
    system = os.path.realpath(shutil.which("python3", path="/usr/bin:/bin") or sys.executable)
    chosen = run_sandboxed(textwrap.dedent(_runs_with(system)), 10.0, 256, isolation="none",
                           python=system)  # fmt: skip
    assert chosen.status == "passed", chosen.stderr


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="as root the sandbox drops to nobody")
def test_as_root_the_sandboxed_program_is_nobody_with_no_groups():
    code = """
    import os
    assert (os.getuid(), os.getgid(), os.getgroups()) == (65534, 65534, []), (
        os.getuid(), os.getgid(), os.getgroups())
    """
    assert run_sandboxed(textwrap.dedent(code), 10.0, 256).status == "passed"


@pytest.mark.parametrize(
    "kw",
    [{"timeout_s": 0}, {"memory_mb": 0}, {"disk_mb": 0}, {"max_files": 0}, {"max_procs": -1}],
)
def test_each_limit_is_refused_at_zero_or_below(kw):
    with pytest.raises(ValueError, match="must be positive and max_procs >= 0"):
        run_sandboxed("pass", **{"timeout_s": 5.0, "memory_mb": 256, "isolation": "none", **kw})


def test_no_extra_process_is_allowed_at_max_procs_zero():
    result = run_sandboxed("pass", 10.0, 256, isolation="none", max_procs=0)
    assert result.status == "passed"


def test_the_interpreter_is_found_on_path_or_named_in_the_error():
    assert sandbox._interpreter("python3", None) == os.path.realpath(shutil.which("python3"))
    with pytest.raises(FileNotFoundError, match="interpreter 'no-such-python' not found"):
        sandbox._interpreter("no-such-python", None)


def test_readable_by_others_needs_the_read_bit():
    with tempfile.TemporaryDirectory(dir="/tmp") as where:  # /tmp and the dir: o+x
        os.chmod(where, 0o755)
        path = Path(where) / "f"
        path.write_text("x")
        path.chmod(0o640)
        assert not sandbox._readable_by_others(str(path))
        path.chmod(0o644)
        assert sandbox._readable_by_others(str(path))


@pytest.mark.parametrize("n, c, k", [(2, 3, 1), (2, -1, 1), (2, 1, 3), (2, 1, 0)])
def test_pass_at_k_refuses_each_bad_argument_alone(n, c, k):
    with pytest.raises(ValueError, match=f"got n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


@needs_bwrap
def test_check_isolation_passes_here_and_names_a_missing_interpreter():
    assert sandbox.check_isolation() is None
    with pytest.raises(FileNotFoundError, match="interpreter 'no-such-python' not found"):
        sandbox.check_isolation("no-such-python")


def test_check_isolation_without_bubblewrap_names_the_fix(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, **kw: None if name == "bwrap"
                        else real_which(name, **kw))  # fmt: skip
    sandbox._check_bwrap.cache_clear()
    try:
        fix = r"bubblewrap \(bwrap\) is not installed.*apt-get install bubblewrap"
        with pytest.raises(sandbox.SandboxUnavailableError, match=fix):
            sandbox.check_isolation()
    finally:
        sandbox._check_bwrap.cache_clear()


@needs_bwrap
def test_the_defaults_are_ten_seconds_a_gib_and_a_64_mib_tmpfs_of_1024_files():
    """Defaults as documented: 1 GiB over 1 + 3 processes, CPU time ceil(10 s) + 1, and a tmpfs
    of 64 MiB holding 1,024 files besides its root directory."""
    code = f"""
    import os, resource
    assert resource.getrlimit(resource.RLIMIT_AS) == ({2**28}, {2**28})
    assert resource.getrlimit(resource.RLIMIT_CPU) == (11, 11)
    disk = os.statvfs("/sandbox")
    assert (disk.f_blocks * disk.f_frsize, disk.f_files) == ({64 * 2**20}, 1025), disk
    """
    result = run_sandboxed(textwrap.dedent(code))
    assert result.status == "passed", result.stderr


@pytest.mark.parametrize("timeout_s, cpu_s", [(0.25, 2), (1.0, 2), (1.5, 3)])
def test_the_cpu_limit_is_the_timeout_rounded_up_plus_one_second(timeout_s, cpu_s):
    code = f"import resource\nassert resource.getrlimit(resource.RLIMIT_CPU)[0] == {cpu_s}"
    assert run_sandboxed(code, timeout_s, 256, isolation="none").status == "passed"


@pytest.fixture
def root_groups():
    """As root, give this process supplementary groups for the test (restored after)."""
    if os.geteuid() != 0:
        pytest.skip("only root can set its groups")
    before = os.getgroups()
    os.setgroups([0, 100])
    yield [0, 100]
    os.setgroups(before)


@needs_bwrap
def test_a_root_caller_s_groups_are_dropped_in_the_sandbox(root_groups):
    code = "import os\nassert os.getgroups() == [], os.getgroups()"
    result = run_sandboxed(code, 10.0, 256)
    assert result.status == "passed", result.stderr


def test_without_isolation_the_program_keeps_the_caller_s_groups(root_groups):
    code = f"import os\nassert sorted(os.getgroups()) == {root_groups}, os.getgroups()"
    result = run_sandboxed(code, 10.0, 256, isolation="none")
    assert result.status == "passed", result.stderr


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_junk_written_to_the_verdict_pipe_does_not_break_the_verdict(isolation):
    """A hostile program may write undecodable bytes to every pipe it holds."""
    code = """
    import os, stat
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, b"\\xff\\xfe junk\\n")
        except OSError:
            pass
    """
    result = run_sandboxed(textwrap.dedent(code), 10.0, 256, isolation=isolation)
    assert result.status == "passed", result.stderr


def test_without_isolation_an_escaped_process_holding_the_verdict_pipe_cannot_stall_it(tmp_path):
    """A grandchild in a session of its own survives the group kill and keeps the pipe's write
    end open; the verdict is read without waiting for it (it is killed here after)."""
    pid_file = tmp_path / "pid"
    code = f"""
    import os, sys, time
    if os.fork() == 0:
        os.setsid()
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(120)
        os._exit(0)
    while not os.path.exists({str(pid_file)!r}):
        time.sleep(0.01)
    sys.exit(3)
    """
    start = time.monotonic()
    try:
        result = run_sandboxed(textwrap.dedent(code), 60.0, 256, isolation="none")
        elapsed = time.monotonic() - start
    finally:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert (result.status, result.returncode) == ("failed", 3)
    assert elapsed < 60, "the verdict waited for the escaped process"


@needs_bwrap
def test_machines_without_a_seccomp_filter_still_run_the_sandbox(monkeypatch):
    monkeypatch.setattr(sandbox.seccomp, "deny_filter", lambda machine=None: None)
    assert "--seccomp" not in sandbox._bwrap_args("/usr/bin/python3", "/w", None, 2**20, 1)
    result = run_sandboxed("pass", 10.0, 256)
    assert result.status == "passed", result.stderr


def test_an_unreadable_system_python_is_refused_with_the_fix(monkeypatch):
    """As nobody neither this interpreter nor a system python3 that nobody cannot read will do."""
    monkeypatch.setattr(sandbox, "_readable_by_others", lambda path: False)
    monkeypatch.setattr(shutil, "which", lambda name, path=None: "/usr/bin/python3")
    fix = r"and there is no system python3; pass python=PATH to a world-readable interpreter"
    with pytest.raises(sandbox.SandboxUnavailableError, match=fix):
        sandbox._interpreter(None, 65534)
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    with pytest.raises(sandbox.SandboxUnavailableError, match=fix):
        sandbox._interpreter(None, 65534)


_TOPS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


@needs_bwrap
def test_the_top_level_system_dirs_look_inside_as_outside():
    """Merged-/usr links (/bin -> usr/bin) are recreated; what the host lacks stays absent."""
    host = {top: (os.path.exists(top), os.path.islink(top) and os.readlink(top)) for top in _TOPS}
    code = f"""
    import os
    inside = {{top: (os.path.exists(top), os.path.islink(top) and os.readlink(top))
              for top in {_TOPS!r}}}
    assert inside == {host!r}, inside
    """
    result = run_sandboxed(textwrap.dedent(code), 10.0, 256)
    assert result.status == "passed", result.stderr


def test_real_top_level_dirs_are_bound_read_only_and_links_recreated(monkeypatch):
    """A host without merged /usr: its real /bin, /lib, ... are bound read-only; links stay."""
    links = {"/lib64": "usr/lib64"}
    monkeypatch.setattr(os.path, "islink", lambda p: p in links)
    monkeypatch.setattr(os, "readlink", lambda p: links[p])
    monkeypatch.setattr(os.path, "isdir", lambda p: p in _TOPS)
    args = sandbox._bwrap_args("/usr/bin/python3", "/w", None, 2**20, 1)
    assert args[:2] == ["bwrap", "--unshare-all"]
    expected = []
    for top in _TOPS:
        expected += ["--symlink", links[top], top] if top in links else ["--ro-bind", top, top]
    after_tmp = args.index("/tmp") + 1
    candidate = ["--ro-bind", "/w/candidate.py", "/candidate.py"]
    assert args[after_tmp : after_tmp + len(expected) + 3] == [*expected, *candidate]


@pytest.mark.parametrize(
    "interpreter, bound",
    [("/usr/bin/python3", None), ("/usr/local/bin/python3.12", None),
     ("/usr2/bin/python3", "/usr2"), ("/opt/py/bin/python3.12", "/opt/py"),
     ("/root/.pyenv/versions/3.11.7/bin/python3.11", "/root/.pyenv/versions/3.11.7")],
)  # fmt: skip
def test_an_interpreter_prefix_outside_usr_is_bound_read_only(interpreter, bound, monkeypatch):
    monkeypatch.setattr(os.path, "islink", lambda p: False)
    monkeypatch.setattr(os.path, "isdir", lambda p: False)
    args = sandbox._bwrap_args(interpreter, "/w", None, 2**20, 1)
    binds = [args[i + 1] for i, a in enumerate(args) if a == "--ro-bind"]
    assert binds == ["/usr", *([bound] if bound else []), "/w/candidate.py"]
    assert args[0] == "bwrap" and args[-6] == interpreter


@pytest.mark.parametrize("euid, as_user", [(0, 65534), (1000, None)])
def test_the_probe_runs_as_the_user_the_program_will_run_as(euid, as_user, monkeypatch):
    """As root both check_isolation and run_sandboxed probe bwrap as nobody, else as the caller."""
    probed = []

    def probe(interpreter, user):
        probed.append((interpreter, user))
        raise sandbox.SandboxUnavailableError("stop here")

    monkeypatch.setattr(sandbox, "_check_bwrap", probe)
    monkeypatch.setattr(sandbox, "_interpreter", lambda python, user: f"python-for-{user}")
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    with pytest.raises(sandbox.SandboxUnavailableError, match="stop here"):
        sandbox.check_isolation()
    with pytest.raises(sandbox.SandboxUnavailableError, match="stop here"):
        run_sandboxed("pass", 10.0, 256)
    assert probed == [(f"python-for-{as_user}", as_user)] * 2
