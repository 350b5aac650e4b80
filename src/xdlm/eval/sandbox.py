"""Run untrusted candidate programs (MBPP/HumanEval-style pass@k) in a limited child process.

    result = run_sandboxed(candidate_code + "\\n" + test_code, timeout_s=5, memory_mb=512)
    result.passed        # True iff the program exited with status 0 in time

Isolation: a fresh `python -I` process (isolated mode: no user site, no PYTHON* env vars) in its
own session and a temporary working directory, with rlimits on address space, CPU seconds, file
size and number of open files, stdin closed, a wall-clock timeout that kills its whole process
group, and only PATH passed in its environment. This contains accidents (infinite loops, memory
hogs, stray files); it is not a security boundary against hostile code: run benchmarks inside a
container or VM without network as well.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from math import comb


@dataclass(frozen=True)
class SandboxResult:
    """status: "passed", "failed" (non-zero exit, e.g. an assertion), "timeout" or "memory".

    passed: status == "passed"; returncode: the child's exit status (negative: killed by that
    signal; None on timeout); stderr: its last 2,000 characters.
    """

    status: str
    returncode: int | None
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs in the child before the candidate: limits first, then the program as __main__. (Setting
# them here rather than in a preexec_fn keeps the parent's fork free of Python code, which is
# unsafe in a multi-threaded parent such as one running torch.)
_BOOTSTRAP = """
import resource, runpy, sys
mem, cpu = int(sys.argv[1]) * 1024 * 1024, int(sys.argv[2])
for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                 (resource.RLIMIT_FSIZE, 16 * 1024 * 1024), (resource.RLIMIT_NOFILE, 64),
                 (resource.RLIMIT_CORE, 0)):
    hard = resource.getrlimit(lim)[1]
    val = val if hard == resource.RLIM_INFINITY else min(val, hard)
    resource.setrlimit(lim, (val, val))
sys.argv = [sys.argv[3]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_sandboxed(code: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `code` as a Python program under the limits above and report how it ended."""
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}")
    with tempfile.TemporaryDirectory(prefix="xdlm_sandbox_") as workdir:
        path = os.path.join(workdir, "candidate.py")
        cpu_s = max(1, math.ceil(timeout_s) + 1)
        with open(path, "w") as f:
            f.write(code)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, str(memory_mb), str(cpu_s), path],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult("timeout", None, "")
    text = err.decode(errors="replace")[-2000:]
    if proc.returncode == 0:
        return SandboxResult("passed", 0, text)
    if proc.returncode == -signal.SIGXCPU:
        return SandboxResult("timeout", proc.returncode, text)
    if "MemoryError" in text or proc.returncode in (-signal.SIGKILL, -signal.SIGSEGV):
        return SandboxResult("memory", proc.returncode, text)
    return SandboxResult("failed", proc.returncode, text)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n − c, k)/C(n, k) for c correct among n samples (Chen et al.)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)
