"""In-loop validation (the `Validation` part of `xdlm.train.loop.Trainer`): the NELBO of
`xdlm eval` on the first rows of the valid split, with its error bar."""

from __future__ import annotations

import contextlib
import math

import torch

from xdlm.eval.distributed import evaluate_rows_distributed
from xdlm.eval.likelihood import shard_batches
from xdlm.train import distributed as D


class Validation:
    """Validation of a `Trainer`: uses its cfg, ctx, model, ema, kernel, schedule and valid
    (the valid split's `TokenShards`, or None)."""

    def validate(self) -> dict | None:
        """The NELBO of `xdlm eval` on the first rows of the valid split, with its error bar.

        Same estimator (`xdlm.eval.likelihood`: eval.t_samples times per row, eval.quadrature or
        stratified, noise seeded by (eval.seed, row id); the null class of a class-conditional
        model), EMA weights, fp32, on the first eval_batches × batch_size × world rows (fewer
        when the split is smaller): `xdlm eval RUN --max-batches M --batch-size b --precision
        fp32` with M·b = valid_rows gives the same number at a checkpointed step. None when
        there are no rows to validate on.
        """
        batch, world = self.cfg.data.batch_size, self.ctx.world_size
        rows = min(len(self.valid or ()), self.cfg.train.eval_batches * batch * world)
        if D.is_sharded(self.model):  # every rank runs the same number of forwards
            rows -= rows % (batch * world)
        if rows <= 0:
            return None
        ev = self.cfg.eval
        self.model.eval()
        swap = self.ema.swapped(self.model) if self.ema else contextlib.nullcontext()
        with torch.no_grad(), swap:
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
