"""One optimizer step of the train loop (the `TrainStep` part of `xdlm.train.loop.Trainer`).

Per optimizer step: `grad_accum` micro-batches per process; t is stratified over the global batch
(micro × accum × world); each micro-batch's loss is Σ nats / (global real tokens), so the gradient
is that of the global mean NELBO per token however the batch is split. A step whose loss or
gradient norm is not finite is skipped (no optimizer step) and counted in `nan_steps`.

Labelled data with `model.num_classes > 0` trains a class-conditional denoiser: each row's label
is replaced by the null class `num_classes` with probability `train.cond_drop` (classifier-free
guidance needs the unconditional model too).
"""

from __future__ import annotations

import math

import torch

from xdlm.builders import lr_at
from xdlm.core.fused import fused_diffusion_loss
from xdlm.core.objective import diffusion_loss, sample_times
from xdlm.train import distributed as D


class TrainStep:
    """The step of a `Trainer`: uses its cfg, ctx, model / wrapped, kernel, schedule,
    weighting, loss_fn, precision, optimizer, ema, loader, noise_gen, time_gen and state."""

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
        """The step's `grad_accum` batches and the real tokens of the global batch (a 0-dim
        float tensor, summed over ranks)."""
        batches = [self.loader.next_batch() for _ in range(self.cfg.train.grad_accum)]
        count = sum(
            b.tokens.numel() if b.attention_mask is None else int(b.attention_mask.sum())
            for b in batches
        )
        total = D.all_reduce_sum(torch.tensor(float(count), device=self.ctx.device), self.ctx)
        return batches, total

    def _accumulate(self, batches, total_tokens: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch; returns this rank's Σ nats (0-dim)."""
        cfg, ctx = self.cfg.train, self.ctx
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
        return nats

    def train_step(self) -> float | None:
        """One optimizer step; returns the global mean nats/token, or None if it was skipped."""
        cfg, ctx = self.cfg.train, self.ctx
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.state.step)
        batches, total_tokens = self._micro_batches()
        nats = self._accumulate(batches, total_tokens)
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
