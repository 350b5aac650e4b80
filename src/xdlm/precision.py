"""Autocast precision, chosen on the machine that runs the job.

`precision="auto"` picks bf16 autocast only where bf16 matmuls are fast:

- CUDA: when `torch.cuda.is_bf16_supported()` (Ampere and newer), else fp32;
- CPU: by a measured probe (`cpu_bf16_speedup`): fp32 and bf16 matmuls at the model's width
  are timed, alternating, for a fraction of a second (once per process and width); bf16 is
  chosen when it is at least `BF16_MIN_SPEEDUP` times as fast as fp32. CPUs with AMX /
  AVX512-BF16 pass; AVX2-only CPUs (where a bf16 matmul has been measured 5-50x slower than
  fp32) fall back to fp32;
- any other device: fp32.

An explicit `fp32`, `bf16` or `fp16` is always obeyed (fp16 is refused on CPU). Every command
that runs a model (train, sample, eval, images, experiments, benchmarks) resolves its precision
here and prints `Precision.describe()` first, e.g. "precision fp32 (bf16 matmul 48.1x slower on
this CPU, AVX2)".
"""

from __future__ import annotations

import contextlib
import functools
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_MIN_SPEEDUP = 1.25  # bf16 / fp32 throughput ratio from which `auto` picks bf16 on CPU
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: `name` in {fp32, bf16, fp16} and why it was chosen."""

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (float32 for fp32, i.e. autocast off)."""
        return _DTYPES.get(self.name, torch.float32)

    def autocast(self, device: torch.device | str):
        """A context manager running the model under this precision on `device`."""
        device_type = torch.device(device).type
        if self.name == "fp32":
            return torch.autocast(device_type, enabled=False)
        if device_type not in ("cpu", "cuda", "mps", "xpu"):
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)

    def describe(self) -> str:
        return f"precision {self.name} ({self.reason})"


def _matmul_seconds(dtype: torch.dtype, width: int) -> float:
    """Wall seconds of one (512, width) @ (width, width) matmul in `dtype`.

    The shape of a linear layer applied to 512 token vectors of size d = width.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(512, width, generator=gen).to(dtype)
    b = torch.randn(width, width, generator=gen).to(dtype)
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


@functools.cache
def cpu_bf16_speedup(width: int = 256) -> float:
    """Measured fp32 time / bf16 time of a linear layer of width d on this CPU (cached).

    > 1 means bf16 is faster. After one warm-up each, fp32 and bf16 matmuls alternate (so that
    other load on the machine hits both alike) for at least 2 and at most 20 rounds, or until
    0.25 s have passed; the fastest time of each is compared (the minimum is robust to the
    process being preempted). Costs 0.1-1.5 s on an AVX2 CPU where bf16 is 5-50x slower. The
    width is clamped to [256, 512]: below 256 the matmul is too small to show the kernels' speed
    (an AVX2 CPU measured bf16 only 1.2x slower at 128 but 5-15x at 256-768), above 512 the probe
    would cost seconds.
    """
    width = int(min(max(width, 256), 512))
    _matmul_seconds(torch.float32, width), _matmul_seconds(torch.bfloat16, width)
    fp32, bf16, start = [], [], time.perf_counter()
    while len(fp32) < 2 or (len(fp32) < 20 and time.perf_counter() - start < 0.25):
        fp32.append(_matmul_seconds(torch.float32, width))
        bf16.append(_matmul_seconds(torch.bfloat16, width))
    return min(fp32) / min(bf16)


def _cpu_name() -> str:
    return f"this CPU, {torch.backends.cpu.get_cpu_capability()}"


def _auto(device: torch.device, width: int) -> Precision:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"{torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp32", f"{torch.cuda.get_device_name(device)} lacks fast bf16")
    if device.type != "cpu":
        return Precision("fp32", f"auto uses fp32 on {device.type}")
    speedup = cpu_bf16_speedup(width)
    if speedup >= BF16_MIN_SPEEDUP:
        return Precision("bf16", f"bf16 matmul {speedup:.1f}x faster on {_cpu_name()}")
    return Precision("fp32", f"bf16 matmul {1 / speedup:.1f}x slower on {_cpu_name()}")


def resolve_precision(
    precision: str, device: torch.device | str, width: int = 256, *, key: str = "precision"
) -> Precision:
    """`precision` in PRECISIONS on `device` -> the `Precision` to run (see the module doc).

    width: the model's hidden size d, the shape the CPU probe times. key: the setting's name,
        used in error messages (e.g. "train.precision").
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown {key} {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return _auto(device, width)
    if precision == "fp16" and device.type == "cpu":
        raise ValueError(f"{key}=fp16 is not supported on CPU; use bf16, fp32 or auto")
    return Precision(precision, "set explicitly")


def model_width(model: torch.nn.Module) -> int:
    """The model's hidden size d: the most common last dimension of its 2-D weights.

    Embeddings (V, d), attention and MLP-in projections (·, d) and the head (V, d) all end in d.
    """
    dims = Counter(p.shape[-1] for p in model.parameters() if p.dim() == 2)
    if not dims:
        raise ValueError(f"{type(model).__name__} has no 2-D weights to read its width from")
    return dims.most_common(1)[0][0]


def inference_precision(precision: str, device, model: torch.nn.Module) -> Precision:
    """Resolve `--precision` for `model` on `device` and say the choice on stderr."""
    chosen = resolve_precision(precision, device, model_width(model), key="--precision")
    print(chosen.describe(), file=sys.stderr)
    return chosen


def cpu_description() -> dict:
    """This CPU as recorded beside measured figures: model name, ISA capability, threads."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        model = names[0] if names else model
    return {
        "cpu": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
