"""Process-group setup and the one function that applies parallelism to a model.

Nothing else in the library knows it is distributed: the loop asks this module for its rank,
wraps the model here, and reduces (sum, count) pairs with `all_reduce_sum`.

    python -m xdlm train ...                                   # one process (strategy none)
    torchrun --nproc_per_node 2 -m xdlm train ... --set dist.strategy=ddp
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from xdlm.config import DistConfig


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; use device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup_distributed(cfg: DistConfig, device: str) -> DistContext:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.strategy == "none":
        raise ValueError(
            f"launched with WORLD_SIZE={world} but dist.strategy=none; "
            "pass --set dist.strategy=ddp (or fsdp)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world == 1:
        return DistContext(0, 1, 0, dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def wrap_model(model: torch.nn.Module, cfg: DistConfig, ctx: DistContext) -> torch.nn.Module:
    """Apply the configured parallelism (DDP for now) to a model already on `ctx.device`."""
    if ctx.world_size == 1 or cfg.strategy == "none":
        return model
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    raise ValueError(f"unknown dist.strategy {cfg.strategy!r}; choose none or ddp")


def no_sync(wrapped: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP's `no_sync`)."""
    if skip and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Σ over ranks (a new tensor; identity on one process)."""
    if ctx.world_size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
