"""`train.precision` of a run: kept from its checkpoint on a resume, else resolved (`auto` on CPU
times this run's own training step: `xdlm.precision`, `xdlm.precision_probe`)."""

from __future__ import annotations

from pathlib import Path

import torch

from xdlm.core.kernel import MixedKernel
from xdlm.precision import Precision, model_shape, resolve_precision
from xdlm.precision_probe import StepProbe
from xdlm.runs import find_checkpoint, read_meta
from xdlm.train.checkpoint import has_checkpoint


def training_probe(model: torch.nn.Module, kernel: MixedKernel, loss, batch_size: int,
                   seq_len: int) -> StepProbe:  # fmt: skip
    """A StepProbe running one training step of `model` on random x0 (B, L) (no mask token):
    `loss(model, x0, generator)` (the run's loss function with its kernel, schedule and
    weighting), backward, gradients dropped. The global RNG (dropout) is left as it was."""
    gen = torch.Generator().manual_seed(0)

    def run() -> None:
        x0 = torch.randint(kernel.vocab_size, (batch_size, seq_len), generator=gen)
        if kernel.mask_id is not None:
            x0 = torch.where(x0 == kernel.mask_id, (kernel.mask_id + 1) % kernel.vocab_size, x0)
        with torch.random.fork_rng(devices=[]):
            loss(model, x0, gen).nats.backward()
        model.zero_grad(set_to_none=True)

    return StepProbe(f"train step of {model_shape(model)}, B={batch_size} L={seq_len}", run)


def kept_precision(run_dir: Path, resume: bool) -> Precision | None:
    """The precision the run's newest checkpoint was trained with, on a resume (None for a new
    run or a checkpoint from before precisions were recorded)."""
    if not (resume and has_checkpoint(run_dir)):
        return None
    ckpt = find_checkpoint(run_dir)
    saved = read_meta(ckpt).get("precision") or {}
    if saved.get("name") not in ("fp32", "bf16", "fp16"):
        return None
    return Precision(saved["name"], f"kept from the run's checkpoint {ckpt.name}")


def training_precision(setting: str, device: torch.device, probe: StepProbe, run_dir: Path,
                       resume: bool) -> Precision:  # fmt: skip
    """Resolve `train.precision`: `auto` keeps a resumed run's recorded precision (never
    measured again), else measures `probe` on CPU; explicit values are obeyed."""
    kept = kept_precision(run_dir, resume) if setting == "auto" else None
    return resolve_precision(setting, device, probe, key="train.precision", kept=kept)
