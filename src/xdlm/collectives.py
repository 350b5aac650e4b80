"""Who am I among the processes, and the collectives every distributed caller shares.

A `DistContext` (rank, world size, device) is created by `xdlm.train.distributed.setup_distributed`
(or by hand); these functions are identities on one process. They hold no training or evaluation
logic, so `train/` (the loop) and `eval/` (split evaluation, `xdlm.eval.distributed`) both use
them without importing each other. Reduce sums, not means: carry (sum, count) and divide once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    """This process: its rank among `world_size`, its local rank on the node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def all_reduce_sum(x: Tensor, ctx: DistContext) -> Tensor:
    """Σ over ranks (a new tensor; identity on one process)."""
    if ctx.world_size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def rank_share(n: int, ctx: DistContext) -> int:
    """This rank's share of `n` items split as evenly as possible (lower ranks get the extra)."""
    return n // ctx.world_size + int(ctx.rank < n % ctx.world_size)


def rank_items(items: Iterable, ctx: DistContext) -> Iterator:
    """Every `world_size`-th item, starting at `rank` (ranks are disjoint and cover all items)."""
    for i, item in enumerate(items):
        if i % ctx.world_size == ctx.rank:
            yield item


def gather_rows(x: Tensor, ctx: DistContext) -> Tensor:
    """Concatenate `x` (n_r, ...) of every rank along dim 0 in rank order -> (Σ n_r, ...).

    The row counts n_r may differ between ranks; every rank gets the result."""
    if ctx.world_size == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(ctx.world_size)]
    dist.all_gather(counts, n)
    top = int(max(c.item() for c in counts))
    padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts, strict=True)])


def gather_objects(obj, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, e.g. RNG states)."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()
