"""Autocast precision, chosen on the machine that runs the job.

`precision="auto"` picks bf16 autocast only where bf16 is fast:

- CUDA: when `torch.cuda.is_bf16_supported()` (Ampere and newer), else fp32;
- CPU: by timing the command's own step in fp32 and bf16, once per machine and model shape, and
  recording the decision (`xdlm.precision_probe`: bf16 only when its step is at least
  `BF16_MARGIN` times as fast; later processes read the record, so they all agree). A resumed
  training run keeps the precision its checkpoint records (`kept`), never measured again;
- any other device: fp32.

An explicit `fp32`, `bf16` or `fp16` is always obeyed (fp16 is refused on CPU). Every command
that runs a model (train, sample, eval, images, experiments) resolves its precision here and
prints `Precision.describe()` first, e.g. "precision fp32 (bf16 ran the train step of DiT
d=192 ... at 0.94x fp32's speed (median of 6 rounds), below the 1.2x bf16 needs; measured now,
recorded in ~/.cache/xdlm/precision.json)".
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from dataclasses import dataclass

import torch

from xdlm.precision_probe import BF16_MARGIN, CpuChoice, StepProbe, cpu_choice, cpu_model

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
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


def _cpu_reason(choice: CpuChoice, shape: str) -> str:
    """Why `choice` was made: the measured speed-up against the margin, and where it is from."""
    side = "at least" if choice.name == "bf16" else "below"
    rounds = f" (median of {choice.rounds} rounds)" if choice.rounds else ""
    why = (
        f"bf16 ran the {shape} at {choice.speedup:.2f}x fp32's speed{rounds}, {side} the "
        f"{BF16_MARGIN}x bf16 needs on {torch.backends.cpu.get_cpu_capability()}"
    )
    if choice.cached:
        return f"cached from {choice.date} in {choice.path}: {why}"
    where = f"recorded in {choice.path}" if choice.path else "not recorded: cache not writable"
    return f"{why}; measured now, {where}"


def _auto(device: torch.device, probe: StepProbe) -> Precision:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"{torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp32", f"{torch.cuda.get_device_name(device)} lacks fast bf16")
    if device.type != "cpu":
        return Precision("fp32", f"auto uses fp32 on {device.type}")
    choice = cpu_choice(probe)
    return Precision(choice.name, _cpu_reason(choice, probe.shape))


def resolve_precision(
    precision: str,
    device: torch.device | str,
    probe: StepProbe,
    *,
    key: str = "precision",
    kept: Precision | None = None,
) -> Precision:
    """`precision` in PRECISIONS on `device` -> the `Precision` to run (see the module doc).

    probe: the step `auto` times on CPU (not run otherwise). key: the setting's name, used in
        error messages (e.g. "train.precision"). kept: what a resumed run recorded; `auto`
        keeps it.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown {key} {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return kept or _auto(device, probe)
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


def model_shape(model: torch.nn.Module) -> str:
    """`model` as a decision's key: class, width d and parameter count, e.g. "DiT d=192 2.1M"."""
    params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} d={model_width(model)} {params / 1e6:.2f}M params"


def forward_probe(model: torch.nn.Module, batch_size: int, seq_len: int, vocab_size: int):
    """A StepProbe timing one forward of `model` on random z_t (B, L) at t = 0.5 (B,), without
    gradients: the step of sampling and evaluation."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(vocab_size, (batch_size, seq_len), generator=gen)
    t = torch.full((batch_size,), 0.5)

    @torch.no_grad()
    def run() -> None:
        model(z, t)

    return StepProbe(f"forward of {model_shape(model)}, B={batch_size} L={seq_len}", run)


def inference_precision(
    precision: str, device, model: torch.nn.Module, batch_size: int, seq_len: int, vocab_size: int
) -> Precision:
    """Resolve `--precision` for `model` on `device` and say the choice on stderr (`auto` on
    CPU times a forward at batch (batch_size, seq_len) of tokens < vocab_size)."""
    probe = forward_probe(model, batch_size, seq_len, vocab_size)
    chosen = resolve_precision(precision, device, probe, key="--precision")
    print(chosen.describe(), file=sys.stderr)
    return chosen


def cpu_description() -> dict:
    """This CPU as recorded beside measured figures: model name, ISA capability, threads."""
    return {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
