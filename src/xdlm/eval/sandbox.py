"""Run untrusted candidate programs (MBPP/HumanEval-style pass@k) in an isolated child process.

    result = run_sandboxed(candidate_code + "\\n" + test_code, timeout_s=5, memory_mb=512)
    result.passed        # True iff the harness reported, with this run's secret, that the
                         # whole program ran to its end

Isolation (`isolation="bwrap"`, the default; docs/security.md): the program runs under
bubblewrap in new user, PID, network, mount, IPC and UTS namespaces, as an unprivileged user
(uid 65534 when we are root), with no capabilities and an empty environment (PATH only). Its
file system is read-only: the system's `/usr` (and the interpreter's prefix), fresh `/proc` and
`/dev`, an empty root holding `/candidate.py`; the one writable place is its working directory
`/sandbox` (also `/tmp`), a tmpfs of `disk_mb` and `max_files`, which a setup step mounts with
CAP_SYS_ADMIN of the sandbox's own namespaces before exec'ing the harness without any
capability; nothing else (no home, no repository, no /etc). The network namespace has
no interface but a downed loopback. When the program ends or is killed, its PID namespace ends,
and with it every process it started (`setsid`, double fork and all); a wall-clock timeout
kills the whole tree.

Limits hold for the whole process tree (cgroups are not used: they are rarely delegated to an
unprivileged caller): the program runs at most 1 + `max_procs` processes or threads at once
(RLIMIT_NPROC, which Linux ≥ 5.14 counts per user namespace, i.e. per sandbox), each with
`memory_mb / (1 + max_procs)` of address space (RLIMIT_AS), so together they never map more than
`memory_mb`; its files share the tmpfs. Also bounded: CPU seconds, 16 MiB per file,
64 open files, no POSIX message queues; a seccomp filter (`xdlm.eval.seccomp`) denies the calls
that make RAM-backed storage outside both (memfd, System V shared memory), and no nested user
namespace can mount a tmpfs of its own (`--disable-userns`).

Verdict: the parent hands the harness a random per-run secret on stdin; the harness reads it
before the candidate runs, and writes `SECRET passed` to a private pipe only after the program
returned normally (`SECRET memory` after a MemoryError, `SECRET disk` after a full disk or an
oversized file, from any of its processes). Exiting early (`os._exit(0)`,
`sys.exit(0)`), printing "MemoryError" or killing itself is therefore never a pass nor a
memory verdict. Limitation: the candidate shares the harness's interpreter, so code written to
search the harness's memory for the secret could forge a pass; it still cannot escape.

Where isolation is unavailable (no `bwrap`, or user namespaces disabled), `run_sandboxed`
refuses with `SandboxUnavailableError`; `isolation="none"` is the explicit opt-out that runs the
program with the rlimits and the verdict only, not isolated from files, network or processes.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterator
from dataclasses import dataclass
from math import comb
from pathlib import Path

from xdlm.eval import seccomp

ISOLATION = ("bwrap", "none")
_NOBODY = 65534
_INSIDE = "/sandbox"
_CANDIDATE = "/candidate.py"


class SandboxUnavailableError(RuntimeError):
    """The requested isolation cannot be set up on this machine."""


@dataclass(frozen=True)
class SandboxResult:
    """status: "passed", "failed" (non-zero exit, e.g. an assertion, or no verdict), "timeout",
    "memory" (a MemoryError: a process reached its share of `memory_mb`) or "disk" (no space
    left in the `disk_mb` tmpfs, or a file over 16 MiB).

    passed: status == "passed"; returncode: the child's exit status (negative: killed by that
    signal; None on timeout); stderr: its last 2,000 characters.
    """

    status: str
    returncode: int | None
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Run first inside bwrap, holding CAP_SYS_ADMIN of the sandbox's own namespaces: mount the
# writable tmpfs with a size AND an inode limit (bwrap's --tmpfs has no inode limit; each file
# costs kernel memory), then exec the harness with the ambient capabilities cleared: a non-root
# uid keeps none across exec (and no_new_privs ignores file capabilities).
_SETUP = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
opts = ("size=%s,nr_inodes=%s,mode=1777" % tuple(sys.argv[1:3])).encode()
for step in (lambda: libc.unshare(0x20000),  # CLONE_NEWNS: a mount namespace we own
             lambda: libc.mount(b"tmpfs", b"/sandbox", b"tmpfs", 6, opts),  # nosuid, nodev
             lambda: libc.prctl(47, 4, 0, 0, 0)):  # PR_CAP_AMBIENT_CLEAR_ALL
    if step() != 0:
        sys.exit("xdlm sandbox setup: " + os.strerror(ctypes.get_errno()))
os.chdir("/sandbox")
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""

# The harness, run before the candidate in the sandboxed interpreter: read the secret, set the
# limits, run the program as __main__, report through the verdict fd only if it returned (or
# ran out of memory or disk, in any process of the tree). RLIMIT_NPROC counts the processes of
# this uid already running: with bwrap those of this sandbox's user namespace.
# (Limits set here rather than in a preexec_fn keep the parent's fork free of Python code.)
_BOOTSTRAP = """
import errno, os, resource, runpy, sys
def main():
    held = [line for line in open("/proc/self/status")
            if line.startswith(("CapPrm", "CapEff", "CapAmb")) and int(line.split()[1], 16)]
    if held and os.getuid() != 0:
        sys.exit("xdlm sandbox: the harness still holds capabilities")
    secret = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    mem, cpu, nproc = (int(a) for a in sys.argv[1:4])
    verdict_fd, me, running = int(sys.argv[5]), os.getpid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            running += os.stat("/proc/" + pid).st_uid == os.getuid()
        except OSError:
            pass
    for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, 16 * 1024 * 1024), (resource.RLIMIT_NOFILE, 64),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, running + nproc),
                     (resource.RLIMIT_MSGQUEUE, 0)):
        hard = resource.getrlimit(lim)[1]
        val = val if hard == resource.RLIM_INFINITY else min(val, hard)
        resource.setrlimit(lim, (val, val))
    sys.argv = [sys.argv[4]]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        status = "passed"
    except MemoryError:
        status = "memory"
    except OSError as err:
        if err.errno not in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        status = "memory" if err.errno == errno.ENOMEM else "disk"
    if status != "passed" or os.getpid() == me:
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
    max_procs: int = 3,
    disk_mb: int = 64,
    max_files: int = 1024,
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as a Python program isolated and limited as in the module docstring.

    Args:
        memory_mb: address space of the whole process tree; each of its at most 1 + max_procs
            processes gets memory_mb / (1 + max_procs), at least 32 MiB.
        isolation: "bwrap" (default; refused with `SandboxUnavailableError` where it cannot be
            set up) or "none" (rlimits only: the candidate can read files and use the network,
            and `disk_mb` does not apply).
        max_procs: processes (or threads) the program may start besides itself.
        disk_mb, max_files: size and files (directories and links count) of its writable
            tmpfs (`/sandbox` = `/tmp`), RAM-backed.
        python: interpreter to run it with (default: this one, or the system python3 when the
            unprivileged sandbox user cannot read this one, e.g. under /root).
    """
    if min(timeout_s, memory_mb, disk_mb, max_files) <= 0 or max_procs < 0:
        raise ValueError(
            f"timeout_s, memory_mb, disk_mb and max_files must be positive and max_procs >= 0, "
            f"got {timeout_s}, {memory_mb}, {disk_mb}, {max_files}, {max_procs}"
        )
    share = memory_mb * 2**20 // (1 + max_procs)
    if share < 32 * 2**20:
        raise ValueError(
            f"memory_mb={memory_mb} over 1 + max_procs={max_procs} processes leaves "
            f"{share / 2**20:.1f} MiB each; an interpreter needs 32: raise memory_mb to "
            f"{32 * (1 + max_procs)} or lower max_procs"
        )
    if isolation not in ISOLATION:
        raise ValueError(f"unknown isolation {isolation!r}; choose one of {ISOLATION}")
    as_user = _NOBODY if os.geteuid() == 0 and isolation == "bwrap" else None
    interpreter = _interpreter(python, as_user)
    if isolation == "bwrap":
        _check_bwrap(interpreter, as_user)
    with _workdir(code, as_user) as workdir, _seccomp_fd() as filter_fd:
        limits = [str(share), str(math.ceil(timeout_s) + 1), str(max_procs)]  # CPU s >= 2
        harness = ["-I", "-c", _BOOTSTRAP, *limits]
        if isolation == "none":
            cmd = [interpreter, *harness, f"{workdir}/candidate.py"]
            return _run(cmd, workdir, None, timeout_s, ())
        tmpfs = _bwrap_args(interpreter, workdir, filter_fd, disk_mb * 2**20, max_files)
        cmd = [*tmpfs, *harness, _CANDIDATE]
        return _run(cmd, None, as_user, timeout_s, (filter_fd,) if filter_fd else ())


def _run(
    cmd: list[str], cwd: str | None, as_user: int | None, timeout_s: float, fds: tuple
) -> SandboxResult:
    """Start `cmd` (inheriting `fds`) with the secret on stdin and the verdict pipe's write end
    as its fd given by the last argument; judge how it ended. stderr goes to a file
    (RLIMIT_FSIZE bounds it)."""
    secret = secrets.token_hex(16)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with tempfile.TemporaryFile() as err_file, os.fdopen(read_end, "rb") as verdict_pipe:
        try:
            proc = subprocess.Popen(
                [*cmd, str(write_end)], cwd=cwd, stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=err_file, env={"PATH": "/usr/bin:/bin"},
                start_new_session=True, pass_fds=(write_end, *fds), user=as_user, group=as_user,
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
        raw = (verdict_pipe.read(1 << 16) or b"").decode(errors="replace")
        verdicts = {line.strip() for line in raw.splitlines()}
        err_file.seek(max(0, err_file.seek(0, os.SEEK_END) - 2000))
        text = err_file.read().decode(errors="replace")
    for limit in ("memory", "disk"):  # reported by any process of the tree
        if f"{secret} {limit}" in verdicts:
            return SandboxResult(limit, proc.returncode, text)
    if f"{secret} passed" in verdicts and proc.returncode == 0:
        return SandboxResult("passed", 0, text)
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


def _bwrap_args(
    interpreter: str, workdir: str, filter_fd: int | None, disk_bytes: int, max_files: int
) -> list[str]:
    """bubblewrap and `_SETUP`, to be followed by the harness' interpreter arguments: every
    namespace new (and no further user namespace: it could mount its own tmpfs), the seccomp
    filter read from `filter_fd`, the whole file system read-only but the tmpfs `_SETUP` mounts
    at `/sandbox` (`/tmp` links to it), workdir/candidate.py bound read-only at `/candidate.py`."""
    args = [
        "bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
        "--new-session", "--cap-drop", "ALL", "--cap-add", "CAP_SYS_ADMIN",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", _INSIDE,
        "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
        "--dir", _INSIDE, "--symlink", _INSIDE, "/tmp",
    ]  # fmt: skip
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = str(Path(interpreter).parent.parent)  # PREFIX/bin/python3.X
    if not (prefix + "/").startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]
    if filter_fd is not None:
        args += ["--seccomp", str(filter_fd)]
    args += ["--ro-bind", f"{workdir}/candidate.py", _CANDIDATE, "--remount-ro", "/"]
    # nr_inodes counts the tmpfs' root directory too
    return [*args, interpreter, "-I", "-c", _SETUP, str(disk_bytes), str(max_files + 1)]


def check_isolation(python: str | None = None) -> None:
    """Raise `SandboxUnavailableError` (with the fix) unless `run_sandboxed` can isolate here."""
    as_user = _NOBODY if os.geteuid() == 0 else None
    _check_bwrap(_interpreter(python, as_user), as_user)


@functools.lru_cache(maxsize=8)
def _check_bwrap(interpreter: str, as_user: int | None) -> None:
    """Probe once per process that bubblewrap can start the interpreter; refuse otherwise."""
    if shutil.which("bwrap") is None:
        reason = "bubblewrap (bwrap) is not installed"
    else:
        with _workdir("", as_user) as workdir, _seccomp_fd() as filter_fd:
            cmd = [*_bwrap_args(interpreter, workdir, filter_fd, 2**20, 1), "-I", "-c", "pass"]
            probe = subprocess.run(
                cmd, capture_output=True, timeout=60, user=as_user, group=as_user,
                pass_fds=(filter_fd,) if filter_fd else (),
                extra_groups=[] if as_user is not None else None, env={"PATH": "/usr/bin:/bin"},
            )  # fmt: skip
        if probe.returncode == 0:
            return
        reason = (
            f"bwrap failed: {probe.stderr.decode(errors='replace').strip()[:300]} (xdlm needs "
            "bubblewrap >= 0.8 for --disable-userns, and a user namespace may mount a tmpfs)"
        )
    raise SandboxUnavailableError(
        f"cannot isolate model-written code: {reason}. Install bubblewrap (Debian/Ubuntu: "
        "apt-get install bubblewrap; it needs user namespaces, e.g. sysctl "
        "kernel.unprivileged_userns_clone=1) or pass isolation='none' to accept running it "
        "with resource limits only (it could then read your files, use the network and "
        "outlive the run)"
    )


@contextlib.contextmanager
def _seccomp_fd() -> Iterator[int | None]:
    """A readable fd holding this machine's seccomp program (None where there is none)."""
    program = seccomp.deny_filter()
    if program is None:
        yield None
        return
    with tempfile.TemporaryFile() as fh:
        fh.write(program)
        fh.seek(0)
        yield fh.fileno()


@contextlib.contextmanager
def _workdir(code: str, as_user: int | None) -> Iterator[str]:
    """A private temporary directory holding candidate.py, owned by `as_user` when given."""
    with tempfile.TemporaryDirectory(prefix="xdlm_sandbox_") as workdir:
        Path(workdir, "candidate.py").write_text(code)
        if as_user is not None:
            for p in (workdir, os.path.join(workdir, "candidate.py")):
                os.chown(p, as_user, as_user)
        yield workdir


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n − c, k)/C(n, k) for c correct among n samples (Chen et al.)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)
