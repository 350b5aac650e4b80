"""The training loop: one readable loop, nanoGPT-style.

    xdlm train --config configs/quickstart.yaml --out runs/quickstart          # CPU, one process
    xdlm train --config configs/quickstart.yaml --out runs/quickstart --resume # continue exactly
    torchrun --nproc_per_node 2 -m xdlm train --config ... --out ... --set dist.strategy=ddp

Per optimizer step: `grad_accum` micro-batches per process; t is stratified over the global batch
(micro × accum × world); each micro-batch's loss is Σ nats / (global real tokens), so the gradient
is that of the global mean NELBO per token however the batch is split.

(One file over the usual 400 lines on purpose: setup, resume, save, the step and validation of
the single loop read top to bottom in one class.)

Labelled data (e.g. image tokens, `xdlm.data.images`) with `model.num_classes > 0` trains a
class-conditional denoiser: each row's label is replaced by the null class `num_classes` with
probability `train.cond_drop` (classifier-free guidance needs the unconditional model too).
"""

from __future__ import annotations

import contextlib
import json
import math
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
from xdlm.config import XDLMConfig, config_changes, config_from_dict, save_config, validate
from xdlm.core.fused import fused_diffusion_loss
from xdlm.core.objective import diffusion_loss, sample_times
from xdlm.core.schedules import schedule_spec
from xdlm.data.loader import ShardedLoader, TokenShards
from xdlm.data.manifest import MANIFEST_FILE, sha256_file
from xdlm.data.tokenizers import load_tokenizer_dir
from xdlm.diskfull import is_write_failure
from xdlm.eval.distributed import evaluate_rows_distributed
from xdlm.eval.likelihood import shard_batches
from xdlm.models.ema import EMA
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
from xdlm.train.interrupts import StopRequest
from xdlm.train.precision_choice import training_precision, training_probe
from xdlm.train.rundir import acquire_run_lock, trim_metrics
from xdlm.train.trackers import Trackers


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


@dataclass
class _State:
    """Everything besides weights that a resume must restore."""

    step: int = 0
    nan_steps: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0


class Trainer:
    """Holds the objects of one run; `run()` is the loop."""

    def __init__(self, cfg: XDLMConfig, run_dir: str | Path, resume: bool = False):
        self.cfg, self.run_dir = validate(cfg), Path(run_dir)
        self.ctx = D.setup_distributed(cfg.dist, cfg.train.device)
        if self.ctx.is_main:
            self.manifest = ensure_dataset(cfg.data)
        D.barrier(self.ctx)
        self.manifest = ensure_dataset(cfg.data)
        if cfg.data.seq_len != self.manifest.seq_len:
            raise ValueError(
                f"data.seq_len={cfg.data.seq_len} but {cfg.data.path} was prepared "
                f"with seq_len={self.manifest.seq_len}; set data.seq_len="
                f"{self.manifest.seq_len} or prepare the data again"
            )
        shards = TokenShards(cfg.data.path, "train")
        if len(shards) < cfg.data.batch_size * self.ctx.world_size:
            raise ValueError(
                f"{cfg.data.path} has {len(shards)} training rows, fewer than one "
                f"global batch ({cfg.data.batch_size}×{self.ctx.world_size}); lower "
                "data.batch_size or data.seq_len, or add data"
            )
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
        self.noise_gen = torch.Generator(dev).manual_seed(cfg.train.seed * 7919 + self.ctx.rank)
        self.time_gen = torch.Generator(dev).manual_seed(cfg.train.seed)  # same on every rank
        torch.manual_seed(cfg.train.seed + 1 + self.ctx.rank)  # dropout differs across ranks
        self.state = _State()
        self._last_loss: tuple[float, int] | None = None  # (loss, step) of the last finite one
        self._saved_step, self._saved_path = -1, None
        self.meta = {
            "kernel": self.kernel.spec(),
            "schedule": schedule_spec(self.schedule),
            "config": cfg.to_dict(),
            "precision": {"name": self.precision.name, "reason": self.precision.reason},
            "data": {  # what was trained on (export's model card, `xdlm plot`'s data check)
                "path": cfg.data.path,
                "sources": self.manifest.sources,
                "manifest_sha256": sha256_file(Path(cfg.data.path) / MANIFEST_FILE),
                "seq_len": self.manifest.seq_len,
                "mode": self.manifest.mode,
                "vocab_size": self.manifest.vocab_size,
                "mask_id": self.manifest.mask_id,
                "tokenizer_sha256": self.manifest.tokenizer_sha256,
            },
        }
        self.loss_fn = diffusion_loss
        if cfg.train.fused_loss:  # the loss fused into the output head: no (B, L, V) logits
            if self.wrapped is not self.model or D.is_sharded(self.model):
                raise ValueError(
                    "train.fused_loss needs dist.strategy=none and compile=false "
                    "(it calls model.hidden, bypassing the wrapper's forward)"
                )
            self.loss_fn = fused_diffusion_loss
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

    # ------------------------------------------------------------------ setup / resume

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

    def close(self) -> None:
        """Close the trackers and release the run directory (its `train.lock`)."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        if self.lock is not None:
            self.lock.release()

    def _resume(self, ckpt: Path) -> None:
        meta = read_meta(ckpt)
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
        self.state = _State(**state["progress"])

    def save(self) -> Path | None:
        """Checkpoint the current step: rank 0 writes (FSDP: every rank writes its DCP shards);
        every rank's loader and RNG states are gathered into the one `state.pt`. Weights
        that are not finite are never saved (NonFiniteLossError; the newest checkpoint stays)."""
        if not weights_finite(self.model, self.ctx):
            raise self._non_finite(self.state.step, "weights after its optimizer step")
        mine = {
            "loader": self.loader.state_dict(),
            "noise_rng": self.noise_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        train_state = {
            "ranks": D.gather_objects(mine, self.ctx),
            "time_rng": self.time_gen.get_state(),
            "progress": vars(self.state).copy(),
        }
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
        kept = newest_checkpoint_name(self.run_dir) if self.ctx.is_main else None
        cfg = self.cfg.train
        return non_finite_error(
            self.run_dir, step, what, self.state.nan_steps, cfg.max_nan_steps, kept,
            self.precision.name,
        )  # fmt: skip

    # ------------------------------------------------------------------ one step

    def _probe_loss(self, model, x0: torch.Tensor, generator: torch.Generator):
        """This run's loss of x0 (B, L) at random t: the step `precision=auto` times."""
        loss = fused_diffusion_loss if self.cfg.train.fused_loss else diffusion_loss
        return loss(model, self.kernel, self.schedule, x0, generator=generator,
                    weighting=self.weighting)  # fmt: skip

    def _cond(self, labels: torch.Tensor | None, drop: float) -> torch.Tensor | None:
        """Class ids (B,) for the denoiser, each replaced by the null class with prob. `drop`;
        None for an unconditional model."""
        n = self.cfg.model.num_classes
        if n == 0:
            return None
        if labels is None:
            raise ValueError(
                f"model.num_classes={n} but {self.cfg.data.path} has no labels; prepare "
                "labelled data (xdlm images prepare) or set model.num_classes=0"
            )
        labels = labels.to(self.ctx.device)
        if int(labels.max()) >= n or int(labels.min()) < 0:
            raise ValueError(f"labels must be in [0, model.num_classes={n}), got {labels.max()}")
        if drop <= 0:
            return labels
        null = torch.rand(labels.shape, generator=self.noise_gen, device=labels.device) < drop
        return torch.where(null, torch.full_like(labels, n), labels)

    def _micro_batches(self):
        batches = [self.loader.next_batch() for _ in range(self.cfg.train.grad_accum)]
        count = sum(
            b.tokens.numel() if b.attention_mask is None else int(b.attention_mask.sum())
            for b in batches
        )
        total = D.all_reduce_sum(torch.tensor(float(count), device=self.ctx.device), self.ctx)
        return batches, total

    def train_step(self) -> float | None:
        """One optimizer step; returns the global mean nats/token, or None if it was skipped."""
        cfg, ctx = self.cfg.train, self.ctx
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.state.step)
        batches, total_tokens = self._micro_batches()
        u = torch.rand((), generator=self.time_gen, device=ctx.device)
        nats = torch.zeros((), device=ctx.device)
        for a, batch in enumerate(batches):
            x0 = batch.tokens.to(ctx.device)
            mask = None if batch.attention_mask is None else batch.attention_mask.to(ctx.device)
            t = sample_times(
                x0.shape[0],
                t_min=cfg.t_min,
                antithetic=cfg.antithetic,
                u=u,
                rank=a * ctx.world_size + ctx.rank,
                device=ctx.device,
                world_size=cfg.grad_accum * ctx.world_size,
                generator=self.time_gen,
            )
            with D.no_sync(self.wrapped, a < len(batches) - 1):  # forward and backward
                with self.precision.autocast(ctx.device):
                    out = self.loss_fn(
                        self.wrapped,
                        self.kernel,
                        self.schedule,
                        x0,
                        attention_mask=mask,
                        t=t,
                        generator=self.noise_gen,
                        weighting=self.weighting,
                        cond=self._cond(batch.labels, cfg.cond_drop),
                    )
                (out.nats * (ctx.world_size / total_tokens)).backward()
            nats += out.nats.detach()
        mean = (D.all_reduce_sum(nats, ctx) / total_tokens).item()
        grad_norm = D.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.state.tokens_seen += int(total_tokens.item())
        if not (math.isfinite(mean) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nan_steps += 1
            if self.state.nan_steps > cfg.max_nan_steps:
                raise self._non_finite(
                    self.state.step + 1, f"loss={mean}, gradient norm={float(grad_norm)}"
                )
            self.state.step += 1
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.state.step += 1
        self.last_grad_norm = float(grad_norm)
        return mean

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict | None:
        """The NELBO of `xdlm eval` on the first rows of the valid split, with its error bar.

        Same estimator (`xdlm.eval.likelihood`: eval.t_samples times per row, eval.quadrature or
        stratified, noise seeded by (eval.seed, row id); the null class of a class-conditional
        model), EMA weights, fp32, on the first eval_batches × batch_size × world rows (fewer
        when the split is smaller): `xdlm eval RUN --max-batches M --batch-size b --precision
        fp32` with M·b = valid_rows gives the same number at a checkpointed step.
        """
        batch, world = self.cfg.data.batch_size, self.ctx.world_size
        rows = min(len(self.valid or ()), self.cfg.train.eval_batches * batch * world)
        if D.is_sharded(self.model):  # every rank runs the same number of forwards
            rows -= rows % (batch * world)
        if rows <= 0:
            return None
        ev = self.cfg.eval
        self.model.eval()
        with self.ema.swapped(self.model) if self.ema else contextlib.nullcontext():
            result = evaluate_rows_distributed(
                self.model, self.kernel, self.schedule, shard_batches(self.valid, batch, rows),
                self.ctx, seed=ev.seed, t_samples=ev.t_samples,
                method=ev.quadrature or "stratified", t_min=self.cfg.train.t_min,
            )  # fmt: skip
        self.model.train()
        return {
            "valid_nats_per_token": result.nats_per_token,
            "valid_se_nats_per_token": result.se_nats_per_token,
            "valid_ppl": math.exp(min(result.nats_per_token, 50.0)),
            "valid_tokens": result.tokens,
            "valid_rows": result.sequences,
        }

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
