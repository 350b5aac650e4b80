"""Experiment trackers fed by the training loop's log records (besides RUN/metrics.jsonl).

    train.tensorboard=true   scalars to RUN/tensorboard/ (torch.utils.tensorboard; needs the
                             `tensorboard` package: pip install 'xdlm[track]', with wandb)
    train.wandb=true         Weights & Biases, offline by default (train.wandb_mode), files in
                             RUN/wandb/; `wandb sync RUN/wandb/offline-run-*` uploads later

Each record is {"step": N, name: value, ...}; training records go under "train/", validation
ones (`valid_*`) under "valid/". Only the main process builds trackers.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path


class Trackers:
    """The trackers a `TrainConfig` asks for; `log(record)` sends a record to all of them."""

    def __init__(self, cfg, run_dir: str | Path, config: dict) -> None:
        self.run_dir = Path(run_dir)
        self._tb = _tensorboard(self.run_dir) if cfg.tensorboard else None
        self._wandb = _wandb(cfg, self.run_dir, config) if cfg.wandb else None

    def log(self, record: dict) -> None:
        step = record["step"]
        scalars = {
            f"{'valid' if k.startswith('valid_') else 'train'}/{k.removeprefix('valid_')}": v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
        }
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(
            "train.tensorboard=true needs the tensorboard package: pip install 'xdlm[track]'"
        ) from err
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _wandb(cfg, run_dir: Path, config: dict):
    """A W&B run whose id comes from the run directory, so a resumed run continues it."""
    try:
        import wandb
    except ImportError as err:
        raise ValueError("train.wandb=true needs wandb: pip install 'xdlm[track]'") from err
    return wandb.init(
        project=cfg.wandb_project, name=run_dir.name, dir=str(run_dir), config=config,
        mode=cfg.wandb_mode, resume="allow",
        id=hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16],
    )  # fmt: skip
