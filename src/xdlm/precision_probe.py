"""`precision=auto` on CPU: time the model's own step in fp32 and bf16, decide once per machine.

Whether bf16 autocast pays on a CPU depends on the CPU (AMX / AVX512-BF16 or not), the model's
shape and the load, so it is measured on what matters: the step the command runs (a training
step, forward + loss + backward, for `xdlm train`; a forward for sample / eval / images) at the
run's batch shape (B, L). `measure` alternates fp32 and bf16 steps (the order swapped every
round, so load drifts hit both alike) and takes the median of the per-round ratios
fp32 seconds / bf16 seconds; `decide` picks bf16 only when that speed-up is at least
`BF16_MARGIN` (alternating steps under load differ by ±10 %, so noise cannot flip a choice made
with this margin; in between, fp32 is the more accurate choice).

The decision is measured once per machine and model shape and recorded in
`cache_dir()/precision.json` (`$XDLM_CACHE_DIR`, else `$XDG_CACHE_HOME/xdlm`, else
`~/.cache/xdlm`), keyed by CPU model, ISA capability, threads, torch version and shape; every
later process reads it, so fresh processes agree whatever the load. A file lock makes processes
that start together wait for the first one's measurement. Delete the file to measure again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

BF16_MARGIN = 1.2  # bf16 must make the step at least this many times as fast
MIN_ROUNDS, MAX_ROUNDS = 5, 15  # rounds of (fp32 step, bf16 step)
MIN_SECONDS, MAX_SECONDS = 2.0, 30.0  # measuring goes on to MIN_SECONDS, stops at MAX_SECONDS


@dataclass(frozen=True)
class StepProbe:
    """One step of the model to time. `run()` does it (under the autocast being measured);
    `shape` names the model and batch, e.g. "DiT 1.2M params d=192, train step B=32 L=64"."""

    shape: str
    run: Callable[[], None]


@dataclass(frozen=True)
class CpuChoice:
    """The recorded decision: `name` in {fp32, bf16}, the measured median `speedup`
    (fp32 / bf16 step time) over `rounds` rounds, its `date`, and whether it came from the
    cache file `path` (`cached`) or was measured now."""

    name: str
    speedup: float
    rounds: int
    date: str
    path: str
    cached: bool = False


def _timed(step: Callable[[], None], dtype: torch.dtype | None) -> float:
    """Wall seconds of one `step()` under bf16 autocast (`dtype`) or autocast off (None)."""
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    start = time.perf_counter()
    with ctx:
        step()
    return time.perf_counter() - start


def measure(step: Callable[[], None]) -> list[float]:
    """Per-round ratios fp32 seconds / bf16 seconds of `step` (> 1: bf16 faster).

    One warm-up step each; then rounds alternate the order (fp32 first, then bf16 first) until
    MIN_ROUNDS rounds and MIN_SECONDS have passed, at most MAX_ROUNDS rounds or MAX_SECONDS.
    """
    _timed(step, None), _timed(step, torch.bfloat16)
    ratios, start = [], time.perf_counter()
    while len(ratios) < MAX_ROUNDS:
        elapsed = time.perf_counter() - start
        if len(ratios) >= MIN_ROUNDS and elapsed >= MIN_SECONDS or elapsed >= MAX_SECONDS:
            break
        if len(ratios) % 2 == 0:
            fp32, bf16 = _timed(step, None), _timed(step, torch.bfloat16)
        else:
            bf16, fp32 = _timed(step, torch.bfloat16), _timed(step, None)
        ratios.append(fp32 / bf16)
    return ratios


def decide(ratios: list[float]) -> tuple[str, float]:
    """(precision, median speed-up) of measured ratios: bf16 iff the median ≥ BF16_MARGIN."""
    if not ratios:
        raise ValueError("no measured rounds to decide the precision from")
    speedup = statistics.median(ratios)
    return ("bf16" if speedup >= BF16_MARGIN else "fp32"), speedup


def cache_dir() -> Path:
    """Where decisions are recorded: $XDLM_CACHE_DIR, $XDG_CACHE_HOME/xdlm or ~/.cache/xdlm."""
    if os.environ.get("XDLM_CACHE_DIR"):
        return Path(os.environ["XDLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xdlm"


def cpu_model() -> str:
    """This CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """CPU model, ISA capability, threads and torch version: what a decision holds for."""
    return (
        f"{cpu_model()} | {torch.backends.cpu.get_cpu_capability()} | "
        f"{torch.get_num_threads()} threads | torch {torch.__version__}"
    )


def _read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: measured again and rewritten
        return {}
    return entries if isinstance(entries, dict) else {}


def _valid(entry) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("name") in ("fp32", "bf16")
        and isinstance(entry.get("speedup"), (int, float))
        and isinstance(entry.get("date"), str)
    )


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive flock on `path`.lock (processes starting together measure once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def cpu_choice(probe: StepProbe) -> CpuChoice:
    """The recorded choice for `probe.shape` on this machine, measured (and recorded) if none is.

    A cache directory that cannot be written is no error: the measurement then holds for this
    process only (`path` is empty).
    """
    path = cache_dir() / "precision.json"
    try:
        with _locked(path):
            return _recorded_or_measured(probe, path, f"{machine_key()} | {probe.shape}")
    except OSError:  # the directory or its lock file cannot be created
        return _measured(probe, "")


def _recorded_or_measured(probe: StepProbe, path: Path, key: str) -> CpuChoice:
    entry = _read(path).get(key)
    if _valid(entry):
        fields = {f: entry[f] for f in ("name", "speedup", "rounds", "date") if f in entry}
        return CpuChoice(**{"rounds": 0, **fields}, path=str(path), cached=True)
    choice = _measured(probe, str(path))
    entries = _read(path)
    entries[key] = {k: v for k, v in asdict(choice).items() if k not in ("path", "cached")}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:  # a full disk, or `path` is not a file: no temporary is left behind
        tmp.unlink(missing_ok=True)
        return replace(choice, path="")
    return choice


def _measured(probe: StepProbe, path: str) -> CpuChoice:
    where = f"once for this machine, recorded in {path}" if path else "cache not writable"
    print(f"precision=auto: timing the {probe.shape} in fp32 and bf16 ({where})",
          file=sys.stderr, flush=True)  # fmt: skip
    ratios = measure(probe.run)
    name, speedup = decide(ratios)
    date = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    return CpuChoice(name, round(speedup, 3), len(ratios), date, path)


def recorded_choices() -> dict:
    """{shape: recorded decision} of this machine (CPU, threads, torch) from the cache file."""
    prefix = machine_key() + " | "
    entries = _read(cache_dir() / "precision.json")
    return {k[len(prefix) :]: v for k, v in entries.items() if k.startswith(prefix)}
