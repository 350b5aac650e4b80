"""Run untrusted candidate programs (MBPP/HumanEval-style pass@k) in an isolated child process.

    result = run_sandboxed(candidate_code + "\\n" + test_code, timeout_s=5, memory_mb=512)
    result.passed        # True iff the harness reported, with this run's secret, that the
                         # whole program ran to its end

Isolation (`isolation="bwrap"`, the default; docs/security.md): the program runs under
bubblewrap in new user, PID, network, mount, IPC and UTS namespaces, as an unprivileged user
(uid 65534 when we are root), with no capabilities and an empty environment (PATH only). Its
file system is the system's `/usr` (and the interpreter's prefix) read-only, fresh `/proc`,
`/dev` and `/tmp`, and one writable temporary directory; nothing else (no home, no repository,
no /etc). The network namespace has no interface but a downed loopback. rlimits bound address
space, CPU seconds, file size, open files and processes (`max_procs` more than the sandbox user
already runs). When the program ends or is killed, its PID namespace ends, and with it every
process it started (`setsid`, double fork and all); a wall-clock timeout kills the whole tree.

Verdict: the parent hands the harness a random per-run secret on stdin; the harness reads it
before the candidate runs, and writes `SECRET passed` (or `SECRET memory` after a MemoryError)
to a private pipe only after the program returned normally. Exiting early (`os._exit(0)`,
`sys.exit(0)`), printing "MemoryError" or killing itself is therefore never a pass nor a
memory verdict. Limitation: the candidate shares the harness's interpreter, so code written to
search the harness's memory for the secret could forge a pass; it still cannot escape.

Where isolation is unavailable (no `bwrap`, or user namespaces disabled), `run_sandboxed`
refuses with `SandboxUnavailableError`; `isolation="none"` is the explicit opt-out that runs the
program with the rlimits and the verdict only, not isolated from files, network or processes.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from math import comb
from pathlib import Path

ISOLATION = ("bwrap", "none")
_NOBODY = 65534
_INSIDE = "/sandbox"


class SandboxUnavailableError(RuntimeError):
    """The requested isolation cannot be set up on this machine."""


@dataclass(frozen=True)
class SandboxResult:
    """status: "passed", "failed" (non-zero exit, e.g. an assertion, or no verdict), "timeout"
    or "memory" (the harness caught a MemoryError).

    passed: status == "passed"; returncode: the child's exit status (negative: killed by that
    signal; None on timeout); stderr: its last 2,000 characters.
    """

    status: str
    returncode: int | None
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The harness, run before the candidate in the sandboxed interpreter: read the secret, set the
# limits, run the program as __main__, report through the verdict fd only if it returned.
# (Limits set here rather than in a preexec_fn keep the parent's fork free of Python code.)
_BOOTSTRAP = """
import os, resource, runpy, sys
def main():
    secret = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    mem, cpu, nproc = (int(a) for a in sys.argv[1:4])
    verdict_fd = int(sys.argv[5])
    for lim, val in ((resource.RLIMIT_AS, mem * 1024 * 1024), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, 16 * 1024 * 1024), (resource.RLIMIT_NOFILE, 64),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
        hard = resource.getrlimit(lim)[1]
        val = val if hard == resource.RLIM_INFINITY else min(val, hard)
        resource.setrlimit(lim, (val, val))
    sys.argv = [sys.argv[4]]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        status = "passed"
    except MemoryError:
        status = "memory"
    os.write(verdict_fd, f"{secret} {status}\\n".encode())
    os.close(verdict_fd)
main()
"""


def run_sandboxed(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    *,
    isolation: str = "bwrap",
    max_procs: int = 32,
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as a Python program isolated and limited as in the module docstring.

    Args:
        isolation: "bwrap" (default; refused with `SandboxUnavailableError` where it cannot be
            set up) or "none" (rlimits only: the candidate can read files and use the network).
        max_procs: processes the program may add (RLIMIT_NPROC above the sandbox user's count).
        python: interpreter to run it with (default: this one, or the system python3 when the
            unprivileged sandbox user cannot read this one, e.g. under /root).
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_procs <= 0:
        raise ValueError(
            f"timeout_s, memory_mb and max_procs must be positive, got {timeout_s}, "
            f"{memory_mb}, {max_procs}"
        )
    if isolation not in ISOLATION:
        raise ValueError(f"unknown isolation {isolation!r}; choose one of {ISOLATION}")
    as_user = _NOBODY if os.geteuid() == 0 and isolation == "bwrap" else None
    interpreter = _interpreter(python, as_user)
    if isolation == "bwrap":
        _check_bwrap(interpreter, as_user)
    with tempfile.TemporaryDirectory(prefix="xdlm_sandbox_") as workdir:
        Path(workdir, "candidate.py").write_text(code)
        if as_user is not None:
            for p in (workdir, os.path.join(workdir, "candidate.py")):
                os.chown(p, as_user, as_user)
        inside = _INSIDE if isolation == "bwrap" else workdir
        nproc = _processes_of(as_user if as_user is not None else os.getuid()) + max_procs
        limits = [str(memory_mb), str(max(1, math.ceil(timeout_s) + 1)), str(nproc)]
        cmd = [interpreter, "-I", "-c", _BOOTSTRAP, *limits, f"{inside}/candidate.py"]
        if isolation == "bwrap":
            cmd = [*_bwrap_args(interpreter, workdir), *cmd]
        return _run(cmd, workdir if isolation == "none" else None, as_user, timeout_s)


def _run(cmd: list[str], cwd: str | None, as_user: int | None, timeout_s: float) -> SandboxResult:
    """Start `cmd` with the secret on stdin and the verdict pipe's write end as its fd given
    by the last argument; judge how it ended. stderr goes to a file (RLIMIT_FSIZE bounds it)."""
    secret = secrets.token_hex(16)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with tempfile.TemporaryFile() as err_file, os.fdopen(read_end, "rb") as verdict_pipe:
        try:
            proc = subprocess.Popen(
                [*cmd, str(write_end)], cwd=cwd, stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=err_file, env={"PATH": "/usr/bin:/bin"},
                start_new_session=True, pass_fds=(write_end,), user=as_user, group=as_user,
                extra_groups=[] if as_user is not None else None,
            )  # fmt: skip
        finally:
            os.close(write_end)
        try:
            proc.communicate(input=(secret + "\n").encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return SandboxResult("timeout", None, "")
        _kill_group(proc)  # what is left of its process group (isolation="none")
        verdict = (verdict_pipe.read(256) or b"").decode(errors="replace").strip()
        err_file.seek(max(0, err_file.seek(0, os.SEEK_END) - 2000))
        text = err_file.read().decode(errors="replace")
    if verdict == f"{secret} passed" and proc.returncode == 0:
        return SandboxResult("passed", 0, text)
    if verdict == f"{secret} memory":
        return SandboxResult("memory", proc.returncode, text)
    if proc.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return SandboxResult("timeout", proc.returncode, text)
    return SandboxResult("failed", proc.returncode, text)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group (with bwrap: its monitor, whose death ends the PID namespace
    and every process in it) and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _readable_by_others(path: str) -> bool:
    """Whether a user other than the owner can reach and read `path` (every parent dir o+x)."""
    p = Path(path)
    for parent in p.parents:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(p).st_mode & stat.S_IROTH)


def _interpreter(python: str | None, as_user: int | None) -> str:
    if python is not None:
        found = shutil.which(python)
        if found is None:
            raise FileNotFoundError(f"interpreter {python!r} not found; pass a python path")
        return os.path.realpath(found)
    mine = os.path.realpath(sys.executable)
    if as_user is None or _readable_by_others(mine):
        return mine
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system and _readable_by_others(os.path.realpath(system)):
        return os.path.realpath(system)
    raise SandboxUnavailableError(
        f"the unprivileged sandbox user cannot read this interpreter ({mine}) and there is no "
        "system python3; pass python=PATH to a world-readable interpreter"
    )


def _bwrap_args(interpreter: str, workdir: str) -> list[str]:
    """bubblewrap: every namespace new, the system read-only, one writable directory."""
    args = [
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", _INSIDE,
        "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
    ]  # fmt: skip
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = str(Path(interpreter).parent.parent)  # PREFIX/bin/python3.X
    if not (prefix + "/").startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]
    return [*args, "--bind", workdir, _INSIDE, "--chdir", _INSIDE]


@functools.lru_cache(maxsize=8)
def _check_bwrap(interpreter: str, as_user: int | None) -> None:
    """Probe once per process that bubblewrap can start the interpreter; refuse otherwise."""
    if shutil.which("bwrap") is None:
        reason = "bubblewrap (bwrap) is not installed"
    else:
        with tempfile.TemporaryDirectory(prefix="xdlm_sandbox_probe_") as workdir:
            if as_user is not None:
                os.chown(workdir, as_user, as_user)
            cmd = [*_bwrap_args(interpreter, workdir), interpreter, "-I", "-c", "pass"]
            probe = subprocess.run(
                cmd, capture_output=True, timeout=60, user=as_user, group=as_user,
                extra_groups=[] if as_user is not None else None, env={"PATH": "/usr/bin:/bin"},
            )  # fmt: skip
        if probe.returncode == 0:
            return
        reason = f"bwrap failed: {probe.stderr.decode(errors='replace').strip()[:300]}"
    raise SandboxUnavailableError(
        f"cannot isolate model-written code: {reason}. Install bubblewrap (Debian/Ubuntu: "
        "apt-get install bubblewrap; it needs user namespaces, e.g. sysctl "
        "kernel.unprivileged_userns_clone=1) or pass isolation='none' to accept running it "
        "with resource limits only (it could then read your files, use the network and "
        "outlive the run)"
    )


def _processes_of(uid: int) -> int:
    """How many processes `uid` runs now (RLIMIT_NPROC counts them all)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += os.stat(entry.path).st_uid == uid
            except FileNotFoundError:
                continue
    return count


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n − c, k)/C(n, k) for c correct among n samples (Chen et al.)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)
