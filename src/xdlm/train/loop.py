"""The training loop: one readable loop, nanoGPT-style.

    xdlm train --config configs/quickstart.yaml --out runs/quickstart          # CPU, one process
    xdlm train --config configs/quickstart.yaml --out runs/quickstart --resume # continue exactly
    torchrun --nproc_per_node 2 -m xdlm train --config ... --out ... --set dist.strategy=ddp

`Trainer` sets up one run (data checks, model, kernel, optimizer, EMA, loader, RNG streams, run
directory) and `run()` is the loop: step, metrics line, validation and save as configured,
Ctrl-C at a step boundary. Its parts live beside it: the optimizer step (`xdlm.train.step`,
gradient accumulation, the global-batch loss, class-conditional labels), validation
(`xdlm.train.validation`) and the run directory's state (`xdlm.train.run_state`: new run or
resume, checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from xdlm.builders import (
    build_kernel,
    build_model,
    build_optimizer,
    build_schedule,
    build_weighting,
    ensure_dataset,
    lr_at,
    output_size,
)
from xdlm.config import XDLMConfig, save_config, validate
from xdlm.core.fused import fused_diffusion_loss
from xdlm.core.objective import diffusion_loss
from xdlm.data.loader import ShardedLoader, TokenShards
from xdlm.models.ema import EMA
from xdlm.train import distributed as D
from xdlm.train.checkpoint import newest_checkpoint_name
from xdlm.train.failures import NonFiniteLossError  # noqa: F401  (re-exported: the loop's error)
from xdlm.train.interrupts import StopRequest
from xdlm.train.precision_choice import training_precision, training_probe
from xdlm.train.run_state import LoopState, RunState, run_meta
from xdlm.train.rundir import acquire_run_lock
from xdlm.train.step import TrainStep
from xdlm.train.trackers import Trackers
from xdlm.train.validation import Validation


@dataclass
class TrainResult:
    """How a `train` call ended. `last_loss` is the loss of the last step that had a finite one
    (`last_loss_step`); `nan_steps` counts the steps skipped as non-finite (train.max_nan_steps);
    `start_step == step` means there was nothing left to train (a finished run resumed)."""

    run_dir: Path
    step: int
    last_loss: float | None
    valid: dict | None
    interrupted: bool
    tokens_per_s: float
    start_step: int = 0
    last_loss_step: int | None = None
    nan_steps: int = 0


def stream_seed(seed: int, stream: str) -> int:
    """The seed of one named random stream of a run (`noise/<rank>`, `time`, `dropout/<rank>`):
    63 bits of BLAKE2b over (seed, stream). Distinct streams never share a seed, with each other
    or with the initial weights (seeded with `seed` itself), so no two of them draw the same
    numbers (with seed·c + rank style seeds, seed 0's noise and times coincided)."""
    digest = hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _train_shards(cfg: XDLMConfig, manifest, world_size: int) -> TokenShards:
    """The train split, refused when prepared with another seq_len or smaller than one global
    batch (`data.batch_size` × world size rows)."""
    if cfg.data.seq_len != manifest.seq_len:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} but {cfg.data.path} was prepared "
            f"with seq_len={manifest.seq_len}; set data.seq_len="
            f"{manifest.seq_len} or prepare the data again"
        )
    shards = TokenShards(cfg.data.path, "train")
    if len(shards) < cfg.data.batch_size * world_size:
        raise ValueError(
            f"{cfg.data.path} has {len(shards)} training rows, fewer than one "
            f"global batch ({cfg.data.batch_size}×{world_size}); lower "
            "data.batch_size or data.seq_len, or add data"
        )
    return shards


class Trainer(TrainStep, Validation, RunState):
    """Holds the objects of one run; `run()` is the loop."""

    def __init__(self, cfg: XDLMConfig, run_dir: str | Path, resume: bool = False):
        self.cfg, self.run_dir = validate(cfg), Path(run_dir)
        self.ctx = D.setup_distributed(cfg.dist, cfg.train.device)
        if self.ctx.is_main:
            self.manifest = ensure_dataset(cfg.data)
        D.barrier(self.ctx)
        self.manifest = ensure_dataset(cfg.data)
        shards = _train_shards(cfg, self.manifest, self.ctx.world_size)
        self._build(cfg, resume)
        self.loader = ShardedLoader(
            shards,
            cfg.data.batch_size,
            seed=cfg.train.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )
        self.valid = (
            TokenShards(cfg.data.path, "valid") if "valid" in self.manifest.splits else None
        )
        dev = self.ctx.device
        seed, rank = cfg.train.seed, self.ctx.rank
        self.noise_gen = torch.Generator(dev).manual_seed(stream_seed(seed, f"noise/{rank}"))
        self.time_gen = torch.Generator(dev).manual_seed(stream_seed(seed, "time"))  # every rank
        torch.manual_seed(stream_seed(seed, f"dropout/{rank}"))  # dropout differs across ranks
        self.state = LoopState()
        self._last_loss: tuple[float, int] | None = None  # (loss, step) of the last finite one
        self._saved_step, self._saved_path = -1, None
        self.meta = run_meta(cfg, self.manifest, self.kernel, self.schedule, self.precision)
        self.loss_fn = self._loss_function()
        self.trackers: Trackers | None = None  # the resume event logged below is not a scalar
        self.lock = acquire_run_lock(self.run_dir) if self.ctx.is_main else None
        try:
            self._prepare_run_dir(resume)
            if self.ctx.is_main:
                self.trackers = Trackers(cfg.train, self.run_dir, cfg.to_dict())
                if not (resume and (self.run_dir / "config.yaml").is_file()):
                    save_config(cfg, self.run_dir / "config.yaml")  # set up: the run starts
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: XDLMConfig, resume: bool) -> None:
        """Model, kernel, schedule, weighting, precision (rank 0 decides), the wrapped model,
        optimizer and EMA, the same initial weights on every rank and run."""
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and run
        self.model = build_model(cfg.model, self.manifest.vocab_size).to(self.ctx.device)
        # V is the model's output size: an HF head (LLaDA: 126,464) may exceed the tokenizer.
        self.kernel = build_kernel(cfg.kernel, self.manifest, output_size(self.model))
        self.schedule = build_schedule(cfg.kernel)
        self.weighting = build_weighting(cfg.train)
        probe = training_probe(
            self.model, self.kernel, self._probe_loss, cfg.data.batch_size, cfg.data.seq_len
        )
        local = self.ctx.is_main and training_precision(  # rank 0 decides for all
            cfg.train.precision, self.ctx.device, probe, self.run_dir, resume
        )
        self.precision = D.gather_objects(local, self.ctx)[0]
        self.wrapped = D.wrap_model(self.model, cfg.dist, self.ctx)  # FSDP shards in place
        if cfg.train.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.optimizer = build_optimizer(cfg.train, self.model)
        # EMA weights (used for validation and sampling); ema_decay=0 turns them off (8B models).
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

    def _loss_function(self):
        """`diffusion_loss`, or with train.fused_loss the loss fused into the output head (no
        (B, L, V) logits), which needs the unwrapped model."""
        if not self.cfg.train.fused_loss:
            return diffusion_loss
        if self.wrapped is not self.model or D.is_sharded(self.model):
            raise ValueError(
                "train.fused_loss needs dist.strategy=none and compile=false "
                "(it calls model.hidden, bypassing the wrapper's forward)"
            )
        return fused_diffusion_loss

    def close(self) -> None:
        """Close the trackers and release the run directory (its `train.lock`)."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------ the loop

    def _log(self, record: dict) -> None:
        if self.ctx.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)

    def run(self) -> TrainResult:
        """Train to `train.steps`. Ctrl-C finishes the step in flight and saves that step
        boundary (`xdlm.train.interrupts`), so `--resume` continues bit-identically."""
        cfg = self.cfg.train
        self.model.train()
        start, valid, interrupted = self.state.step, None, False
        bar = tqdm(
            total=cfg.steps,
            initial=self.state.step,
            disable=not self.ctx.is_main,
            dynamic_ncols=True,
            desc="train",
        )
        if self.ctx.is_main and start < cfg.steps:
            bar.write(self.precision.describe())
            bar.write(
                D.describe_batch(
                    self.cfg.data.batch_size, cfg.grad_accum, self.cfg.dist.strategy, self.ctx
                )
            )
        self._clock = (time.perf_counter(), self.state.tokens_seen, self.state.elapsed)
        try:
            with StopRequest() as stop:
                while self.state.step < cfg.steps:
                    valid = self._step_and_bookkeeping(bar) or valid
                    if self._stop_agreed(stop) and self.state.step < cfg.steps:
                        interrupted = True
                        break
        except KeyboardInterrupt:
            if self.ctx.is_main:
                print(
                    f"\nstopped without saving; --resume continues from "
                    f"{newest_checkpoint_name(self.run_dir) or 'the start (no checkpoint yet)'}"
                )
            raise
        finally:
            bar.close()
        if interrupted:
            path = self.save() if self._saved_step != self.state.step else self._saved_path
            if self.ctx.is_main:
                print(f"\ninterrupted at step {self.state.step}; saved {path}. "
                      "Continue with --resume.")  # fmt: skip
        last, last_at = self._last_loss or (None, None)
        return TrainResult(
            self.run_dir, self.state.step, last, valid, interrupted, self._tokens_per_s(),
            start_step=start, last_loss_step=last_at, nan_steps=self.state.nan_steps,
        )  # fmt: skip

    def _tokens_per_s(self) -> float:
        t0, tokens0, _ = self._clock
        return (self.state.tokens_seen - tokens0) / max(time.perf_counter() - t0, 1e-9)

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any rank was asked to stop (all ranks leave the loop at the same step)."""
        flag = torch.tensor(float(stop.requested), device=self.ctx.device)
        return bool(D.all_reduce_sum(flag, self.ctx).item() > 0)

    def _step_and_bookkeeping(self, bar: tqdm) -> dict | None:
        """One optimizer step, then its metrics line, validation and save as configured;
        returns the validation metrics when they were computed."""
        cfg = self.cfg.train
        loss = self.train_step()
        if loss is not None:
            self._last_loss = (loss, self.state.step)
        t0, _, elapsed0 = self._clock
        self.state.elapsed = elapsed0 + time.perf_counter() - t0
        tps = self._tokens_per_s()
        bar.update(1)
        shown = self._last_loss[0] if self._last_loss else None
        bar.set_postfix(loss=f"{shown:.3f}" if shown is not None else "nan", tok_s=f"{tps:,.0f}")
        step, valid = self.state.step, None
        if step % cfg.log_every == 0 or step == cfg.steps:
            self._log(
                {
                    "step": step,
                    "loss": loss,
                    "lr": lr_at(cfg, step - 1),
                    "grad_norm": getattr(self, "last_grad_norm", None),
                    "tokens_per_s": tps,
                    "tokens_seen": self.state.tokens_seen,
                    "nan_steps": self.state.nan_steps,
                    "elapsed": self.state.elapsed,
                }
            )
        if step % cfg.eval_every == 0 or step == cfg.steps:
            valid = self.validate()
            if valid is not None:
                self._log({"step": step, **valid})
                bar.write(
                    f"step {step}: valid NELBO {valid['valid_nats_per_token']:.4f} ± "
                    f"{valid['valid_se_nats_per_token']:.4f} nats/token (first "
                    f"{valid['valid_rows']} rows), PPL ≤ {valid['valid_ppl']:.2f}"
                )
        if step % cfg.save_every == 0 or step == cfg.steps:
            self.save()
        return valid


def train(cfg: XDLMConfig, run_dir: str | Path, resume: bool = False) -> TrainResult:
    trainer = Trainer(cfg, run_dir, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
        D.cleanup(trainer.ctx)
