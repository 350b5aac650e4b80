"""What a run directory holds of the train loop (the `RunState` part of
`xdlm.train.loop.Trainer`): the new-run / resume checks, the resume itself, and the checkpoint of
a step boundary (weights, optimizer, EMA, every rank's loader and RNG states, progress), so that
`--resume` continues bit-identically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from xdlm.config import XDLMConfig, config_changes, config_from_dict
from xdlm.core.schedules import schedule_spec
from xdlm.data.manifest import MANIFEST_FILE, sha256_file
from xdlm.data.tokenizers import load_tokenizer_dir
from xdlm.diskfull import is_write_failure
from xdlm.runs import find_checkpoint, read_meta
from xdlm.train import distributed as D
from xdlm.train.checkpoint import (
    has_checkpoint,
    load_optimizer_state,
    load_sharded_state,
    load_train_state,
    newest_checkpoint_name,
    remove_partial_saves,
    save_checkpoint,
    save_sharded_checkpoint,
)
from xdlm.train.failures import NonFiniteLossError, non_finite_error, save_failed, weights_finite
from xdlm.train.rundir import trim_metrics


@dataclass
class LoopState:
    """Everything besides weights that a resume must restore (`progress` of `state.pt`)."""

    step: int = 0
    nan_steps: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0


def run_meta(cfg: XDLMConfig, manifest, kernel, schedule, precision) -> dict:
    """The `meta.json` of every checkpoint of the run (less `step`, added by the save)."""
    return {
        "kernel": kernel.spec(),
        "schedule": schedule_spec(schedule),
        "config": cfg.to_dict(),
        "precision": {"name": precision.name, "reason": precision.reason},
        "data": {  # what was trained on (export's model card, `xdlm plot`'s data check)
            "path": cfg.data.path,
            "sources": manifest.sources,
            "manifest_sha256": sha256_file(Path(cfg.data.path) / MANIFEST_FILE),
            "seq_len": manifest.seq_len,
            "mode": manifest.mode,
            "vocab_size": manifest.vocab_size,
            "mask_id": manifest.mask_id,
            "tokenizer_sha256": manifest.tokenizer_sha256,
        },
    }


class RunState:
    """Resume and save of a `Trainer`: uses its cfg, ctx, run_dir, manifest, kernel, model,
    optimizer, ema, loader, noise_gen, time_gen, state, meta, precision and `_log`."""

    def _prepare_run_dir(self, resume: bool) -> None:
        """Check new-run / resume, cut metrics.jsonl back to the step we start from, copy the
        tokenizer. config.yaml is written by `__init__` once everything is set up (a failed
        start leaves none, a new start replaces one a failed start left) and never by a resume:
        each checkpoint's meta.json holds the config it was trained with, and a resume that
        changes settings logs them to metrics.jsonl."""
        has_ckpt = has_checkpoint(self.run_dir)
        if has_ckpt and not resume:
            raise ValueError(
                f"{self.run_dir} already holds a run; pass --resume to continue it "
                "or choose a new --out"
            )
        if resume and not has_ckpt and not (self.run_dir / "config.yaml").is_file():
            raise FileNotFoundError(
                f"--resume: {self.run_dir} holds no run (no config.yaml, no checkpoint); "
                "drop --resume to start a new run there"
            )
        if self.ctx.is_main:  # we hold the lock: temp dirs are from saves that died
            for stale in remove_partial_saves(self.run_dir):
                print(f"removed {stale}, left by an interrupted save")
        D.barrier(self.ctx)
        if resume and has_ckpt:
            self._resume(find_checkpoint(self.run_dir))
        if self.ctx.is_main:
            # lines logged after the step we continue from (before the first checkpoint: all)
            trim_metrics(self.run_dir / "metrics.jsonl", self.state.step)
            tok, data_tok = self.run_dir / "tokenizer", Path(self.cfg.data.path) / "tokenizer"
            if not tok.is_dir() and data_tok.is_dir():  # image-token data has no tokenizer
                load_tokenizer_dir(data_tok).save(tok)

    def _check_resumable(self, ckpt: Path, meta: dict) -> None:
        """Log the settings this resume changes; refuse another kernel or tokenizer."""
        changes = config_changes(config_from_dict(meta["config"]), self.cfg)
        if changes:
            self._log({"event": "resume", "step": meta["step"], "changes": changes})
        if meta["kernel"] != self.kernel.spec():
            raise ValueError(
                f"checkpoint {ckpt} was trained with kernel {meta['kernel']} but the "
                f"config and data give {self.kernel.spec()}; use the run's own "
                "config.yaml and data, or start a new --out"
            )
        saved, now = meta.get("data", {}).get("tokenizer_sha256"), self.manifest.tokenizer_sha256
        if saved and now and saved != now:
            raise ValueError(
                f"checkpoint {ckpt} was trained on data tokenized with tokenizer {saved[:12]}, "
                f"but {self.cfg.data.path} was tokenized with {now[:12]} (same vocabulary size "
                "or not, the ids mean other tokens); resume on the run's own data"
            )

    def _resume(self, ckpt: Path) -> None:
        """Load weights, optimizer, EMA, this rank's loader and RNG states and the progress."""
        meta = read_meta(ckpt)
        self._check_resumable(ckpt, meta)
        if meta.get("sharded"):
            state = load_sharded_state(ckpt, self.model, self.optimizer, self.ema)
        else:
            state, ema = load_train_state(ckpt, self.model)
            load_optimizer_state(ckpt / "state.pt", self.optimizer, state["optimizer"])
            if ema is not None and self.ema is not None:
                self.ema.load_state_dict(ema)
        mine = D.rank_state(state["ranks"], self.ctx)  # loader, noise and dropout RNG
        self.loader.load_state_dict(mine["loader"])
        if "noise_rng" in mine:
            self.noise_gen.set_state(mine["noise_rng"])
            torch.set_rng_state(mine["torch_rng"])
        self.time_gen.set_state(state["time_rng"])
        self.state = LoopState(**state["progress"])

    def _train_state(self) -> dict:
        """Every rank's loader and RNG states (gathered), the time RNG and the progress."""
        mine = {
            "loader": self.loader.state_dict(),
            "noise_rng": self.noise_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        return {
            "ranks": D.gather_objects(mine, self.ctx),
            "time_rng": self.time_gen.get_state(),
            "progress": vars(self.state).copy(),
        }

    def save(self) -> Path | None:
        """Checkpoint the current step: rank 0 writes (FSDP: every rank writes its DCP shards);
        every rank's loader and RNG states are gathered into the one `state.pt`. Weights
        that are not finite are never saved (NonFiniteLossError; the newest checkpoint stays)."""
        if not weights_finite(self.model, self.ctx):
            raise self._non_finite(self.state.step, "weights after its optimizer step")
        train_state = self._train_state()
        kwargs = dict(
            ema_state=self.ema.state_dict() if self.ema else None,
            meta=self.meta,
            keep_last=self.cfg.train.keep_last,
        )
        path = None
        try:
            if D.is_sharded(self.model):
                path = save_sharded_checkpoint(
                    self.run_dir, self.state.step, model=self.model, optimizer=self.optimizer,
                    train_state=train_state, **kwargs,
                )  # fmt: skip
            elif self.ctx.is_main:
                train_state["optimizer"] = self.optimizer.state_dict()
                path = save_checkpoint(
                    self.run_dir, self.state.step, model=self.model, train_state=train_state,
                    **kwargs,
                )  # fmt: skip
        except Exception as err:
            if not is_write_failure(err):
                raise
            newest = newest_checkpoint_name(self.run_dir)
            raise save_failed(err, self.state.step, self.run_dir / "checkpoints", newest) from err
        D.barrier(self.ctx)
        self._saved_step, self._saved_path = self.state.step, path if self.ctx.is_main else None
        return self._saved_path

    def _non_finite(self, step: int, what: str) -> NonFiniteLossError:
        """The error that stops the run at `step` (naming the checkpoint that is kept)."""
        kept = newest_checkpoint_name(self.run_dir) if self.ctx.is_main else None
        cfg = self.cfg.train
        return non_finite_error(
            self.run_dir, step, what, self.state.nan_steps, cfg.max_nan_steps, kept,
            self.precision.name,
        )  # fmt: skip
