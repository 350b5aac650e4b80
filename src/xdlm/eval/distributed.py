"""Evaluation split across processes: each rank does its share, the rows are gathered.

    ctx = xdlm.train.distributed.setup_distributed(cfg.dist, "auto")     # under torchrun
    result = evaluate_rows_distributed(model, kernel, schedule, batches, ctx, t_samples=4)
    samples = gather_samples(lambda b: generate(..., batch_size=b).tokens, 64, ctx)

Both give every rank the same result as one process would (sequence noise is seeded by row id).
"""

from __future__ import annotations

from torch import Tensor

from xdlm.collectives import DistContext, gather_rows, rank_items, rank_share
from xdlm.eval import likelihood as lk


def gather_samples(generate_fn, num_samples: int, ctx: DistContext) -> Tensor:
    """Sample `num_samples` sequences split across ranks and gathered (rank order) on all ranks.

    `generate_fn(batch_size) -> LongTensor (batch_size, L)` does the per-rank work, e.g.
    `lambda b: xdlm.sampling.generate(model, kernel, schedule, batch_size=b, ...).tokens` with a
    generator seeded by rank. Returns (num_samples, L)."""
    return gather_rows(generate_fn(rank_share(num_samples, ctx)), ctx)


def evaluate_rows_distributed(
    denoiser, kernel, schedule, batches, ctx: DistContext, **kwargs
) -> lk.LikelihoodResult:
    """`xdlm.eval.likelihood.evaluate_rows` with the batches split across ranks (batch i on rank
    i mod W) and the per-sequence bounds gathered before `summarize`: the same result, error
    bars included, as one process (each sequence's noise is seeded by its row id). `kwargs` as
    in `evaluate_rows` (discrete_steps, seed, t_samples, method, t_min)."""
    seq = lk.sequence_bounds(denoiser, kernel, schedule, rank_items(batches, ctx), **kwargs)
    device = next(iter(denoiser.parameters())).device
    nats = gather_rows(seq.nats.to(device), ctx).cpu()
    return lk.summarize(nats, gather_rows(seq.tokens.to(device), ctx).cpu())
