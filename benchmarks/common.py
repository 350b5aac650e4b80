"""Timing, matmul peak and result-file helpers shared by the benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from xdlm.precision import cpu_description
from xdlm.precision_probe import recorded_choices

RESULTS = Path(__file__).resolve().parent / "results"


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time (s) of `repeats` calls: the least-disturbed run on a shared machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_times(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time per case, with the cases interleaved so that load changes hit all alike."""
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            best[name] = min(best[name], best_time(fn, 1))
    return best


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """Measured GFLOP/s of an n×n×n matmul in `dtype` (2·n³ FLOPs): the MFU denominator."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm up
    return 2 * n**3 / best_time(lambda: a @ b, repeats) / 1e9


def machine() -> dict:
    """CPU model, ISA capability, threads, what `precision=auto` picks here, torch, date."""
    return {
        "torch": torch.__version__,
        **cpu_description(),
        "auto_precision": recorded_choices(),  # what `precision=auto` decided here, by shape
        "load_avg_1min": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


_PEAK_PROBE = """
import torch
torch.set_num_threads({threads})
{setup}
def status(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts at the current RSS
{call}
print(base, status("VmHWM"))
"""


def peak_rss(setup: str, call: str, threads: int) -> dict:
    """Peak RSS (MiB, Linux VmHWM) of a fresh process while it runs the statement `call` after
    `setup`, and its rise above the RSS before the call (ru_maxrss would report the parent's
    RSS at fork time)."""
    code = _PEAK_PROBE.format(threads=threads, setup=setup, call=call)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr)
    base, peak = (float(x) for x in res.stdout.split()[-2:])
    return {"peak_mib": peak, "above_before_call_mib": peak - base}
