"""The errors that stop a training run, each one line naming what to do (docs/training.md §3).

- `NonFiniteLossError`: a NaN/inf loss, gradient or weight. By default the first one stops the
  run; `train.max_nan_steps=N` skips up to N such steps (their update is dropped). A checkpoint
  never holds non-finite weights (`weights_finite` is checked before every save), so the newest
  checkpoint is the last good state.
- `save_failed`: a checkpoint write that failed, as an `OSError` naming the step, the cause
  (a full disk is recognised in each form it takes: `OSError` ENOSPC from Python, a
  `SafetensorError` from safetensors, torch's `RuntimeError` "unexpected pos" / "file write
  failed" from its zip writer) and the newest complete checkpoint to resume from.
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch
from safetensors import SafetensorError

from xdlm.collectives import DistContext, all_reduce_sum

# What a full disk looks like in the messages of safetensors (Rust io::Error) and torch's
# PyTorchStreamWriter (inline_container.cc), which carry no errno.
_DISK_FULL_TEXT = ("no space left", "storagefull", "os error 28", "unexpected pos",
                   "file write failed")  # fmt: skip
_TORCH_WRITER_TEXT = ("inline_container", "pytorchstreamwriter", "file write failed")


class NonFiniteLossError(ValueError):
    """A NaN/inf loss, gradient or weight (more than train.max_nan_steps such steps)."""


def non_finite_error(
    run_dir: Path, step: int, what: str, nan_steps: int, max_nan_steps: int, kept: str | None
) -> NonFiniteLossError:
    """The error that stops a run at non-finite step `step`; nothing of that step is saved and
    `kept` (the newest checkpoint's name, or None) is what `--resume` continues from."""
    count = (
        f"{nan_steps} steps had a non-finite loss or gradient, more than train.max_nan_steps="
        f"{max_nan_steps} (last at step {step}: {what})"
        if max_nan_steps
        else f"step {step} had non-finite values ({what})"
    )
    return NonFiniteLossError(
        f"{run_dir}: {count}; stopped without saving it, the newest checkpoint "
        f"{kept or '(none yet)'} is kept. Lower train.lr or use train.precision=fp32 and "
        "continue with --resume, or set train.max_nan_steps=N to skip up to N such steps"
    )


def weights_finite(model: torch.nn.Module, ctx: DistContext) -> bool:
    """Whether every weight is finite on every rank (FSDP: each rank checks its shards)."""
    bad = sum(
        int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
        for p in model.parameters()
    )
    return bool(all_reduce_sum(torch.tensor(float(bad), device=ctx.device), ctx).item() == 0)


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` is a failed file write (not a bug in the caller): an OSError, a
    SafetensorError, or a RuntimeError from torch's checkpoint writer."""
    if isinstance(err, (OSError, SafetensorError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in _TORCH_WRITER_TEXT)


def is_disk_full(err: BaseException) -> bool:
    """Whether the failed write `err` (`is_write_failure`) ran out of space."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return any(m in text for m in _DISK_FULL_TEXT)


def save_failed(err: BaseException, step: int, ckpt_root: Path, newest: str | None) -> OSError:
    """One line for a checkpoint save of `step` that raised `err` (its partial directory was
    already removed); `newest` is the complete checkpoint a resume continues from."""
    first = str(getattr(err, "strerror", None) or err).strip().splitlines()[0][:200]
    full = is_disk_full(err)
    cause = f"no space left on device ({type(err).__name__}: {first})" if full else first
    return OSError(
        errno.ENOSPC if full else getattr(err, "errno", None) or errno.EIO,
        f"saving step {step} into {ckpt_root} failed: {cause}; the partial checkpoint was "
        f"removed, the newest complete one is {newest or 'none'}. Free disk space (or lower "
        "train.keep_last) and continue with --resume",
    )
