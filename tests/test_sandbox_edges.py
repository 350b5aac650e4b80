"""The sandbox's edges (issue 29): how `_run` judges a child from its exit status, verdict line
and stderr (exit codes, SIGXCPU, the 2,000-character tail, undecodable bytes, a wrong secret),
where and as whom the program runs, the argument limits exactly at and one past them, and the
interpreter lookup."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from test_sandbox import needs_bwrap  # noqa: I001  (the shared skip marker)

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
