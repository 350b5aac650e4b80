"""The errors that stop a training run, each one line naming what to do (docs/training.md §3).

- `NonFiniteLossError`: a NaN/inf loss, gradient or weight. By default the first one stops the
  run; `train.max_nan_steps=N` skips up to N such steps (their update is dropped). A checkpoint
  never holds non-finite weights (`weights_finite` is checked before every save), so the newest
  checkpoint is the last good state.
- `save_failed`: a checkpoint write that failed, as an `OSError` naming the step, the cause
  (a full disk is recognised in each form it takes, `xdlm.diskfull`) and the newest complete
  checkpoint to resume from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from xdlm.collectives import DistContext, all_reduce_sum
from xdlm.diskfull import describe, errno_of


class NonFiniteLossError(ValueError):
    """A NaN/inf loss, gradient or weight (more than train.max_nan_steps such steps)."""


def non_finite_error(
    run_dir: Path,
    step: int,
    what: str,
    nan_steps: int,
    max_nan_steps: int,
    kept: str | None,
    precision: str,
) -> NonFiniteLossError:
    """The error that stops a run at non-finite step `step`; nothing of that step is saved and
    `kept` (the newest checkpoint's name, or None) is what `--resume` continues from; the fix
    names fp32 when the run used another `precision`."""
    count = (
        f"{nan_steps} steps had a non-finite loss or gradient, more than train.max_nan_steps="
        f"{max_nan_steps} (last at step {step}: {what})"
        if max_nan_steps
        else f"step {step} had non-finite values ({what})"
    )
    return NonFiniteLossError(
        f"{run_dir}: {count}; stopped without saving it, the newest checkpoint "
        f"{kept or '(none yet)'} is kept. Lower train.lr"
        f"{'' if precision == 'fp32' else ' or use train.precision=fp32'} and continue with "
        "--resume, or set train.max_nan_steps=N to skip up to N such steps"
    )


def weights_finite(model: torch.nn.Module, ctx: DistContext) -> bool:
    """Whether every weight is finite on every rank (FSDP: each rank checks its shards)."""
    bad = sum(
        int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
        for p in model.parameters()
    )
    return bool(all_reduce_sum(torch.tensor(float(bad), device=ctx.device), ctx).item() == 0)


def save_failed(err: BaseException, step: int, ckpt_root: Path, newest: str | None) -> OSError:
    """One line for a checkpoint save of `step` that raised `err` (its partial directory was
    already removed); `newest` is the complete checkpoint a resume continues from."""
    return OSError(
        errno_of(err),
        f"saving step {step} into {ckpt_root} failed: {describe(err)}; the partial checkpoint "
        f"was removed, the newest complete one is {newest or 'none'}. Free disk space (or lower "
        "train.keep_last) and continue with --resume",
    )
