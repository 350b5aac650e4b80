"""Process-group setup and the one function that applies parallelism to a model.

Nothing else in the library knows it is distributed: the loop asks this module for its rank,
wraps the model here (`wrap_model`: DDP, or FSDP2 per transformer block + root, with optional
activation checkpointing, bf16 mixed precision and CPU offload), reduces (sum, count) pairs with
`all_reduce_sum` and gathers per-rank state with `gather_objects` (the collectives live in
`xdlm.collectives`, shared with `xdlm.eval.distributed`).

    python -m xdlm train ...                                           # one process
    torchrun --nproc_per_node 2 -m xdlm train ... --set dist.strategy=ddp
    torchrun --nproc_per_node 8 -m xdlm train ... --set dist.strategy=fsdp \\
        --set dist.activation_checkpointing=true --set dist.mixed_precision=true
    torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --nproc_per_node 8 -m xdlm train ...            # multi-node: docs/distributed.md

A dead peer makes every collective fail after `XDLM_DIST_TIMEOUT_S` seconds (default 600) instead
of hanging; torchrun then stops the other ranks and exits non-zero.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from xdlm.builders import build_device
from xdlm.collectives import (  # noqa: F401  (re-exported: the loop's one distributed module)
    DistContext,
    all_reduce_sum,
    barrier,
    gather_objects,
    gather_rows,
)
from xdlm.config import DistConfig

TIMEOUT_ENV = "XDLM_DIST_TIMEOUT_S"
STRATEGIES = ("none", "ddp", "fsdp")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`train.device` checked by `build_device` (auto: cuda when visible, else cpu); a bare
    "cuda" is this process's GPU, cuda:LOCAL_RANK."""
    name = build_device(name)
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup_distributed(cfg: DistConfig, device: str) -> DistContext:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU).

    Collectives time out after `XDLM_DIST_TIMEOUT_S` seconds (default 600), so a killed peer
    ends the job with an error instead of a hang.
    """
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown dist.strategy {cfg.strategy!r}; choose one of {STRATEGIES}")
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
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)


# ---------------------------------------------------------------------- wrapping (the one place)


def _checkpoint_forward(block: torch.nn.Module) -> None:
    """Recompute `block`'s activations in backward (non-reentrant `torch.utils.checkpoint`).

    Patches the instance's `forward`, so parameter names (EMA, checkpoints) do not change."""
    forward = block.forward

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no `blocks` ModuleList; FSDP and activation "
            "checkpointing wrap one transformer block at a time (DiT / HFDenoiser have it)"
        )
    return blocks


def _fully_shard(model: torch.nn.Module, cfg: DistConfig) -> torch.nn.Module:
    """FSDP2: `fully_shard` every block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if cfg.mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed first in backward: keep them unsharded
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap_model(model: torch.nn.Module, cfg: DistConfig, ctx: DistContext) -> torch.nn.Module:
    """Apply the configured parallelism to a model already on `ctx.device`.

    Returns the module to call in training: `model` itself (one process, or FSDP2, which
    shards `model` in place: its parameters become DTensors, so build the optimizer and EMA
    after this call), or a DDP wrapper around it. Activation checkpointing applies to every
    strategy; mixed precision and CPU offload are FSDP2 policies.
    """
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown dist.strategy {cfg.strategy!r}; choose one of {STRATEGIES}")
    if (cfg.mixed_precision or cfg.cpu_offload) and cfg.strategy != "fsdp":
        raise ValueError(
            "dist.mixed_precision / dist.cpu_offload are FSDP2 policies; set dist.strategy=fsdp "
            "(for bf16 autocast without FSDP use train.precision=bf16)"
        )
    if cfg.activation_checkpointing:
        for block in _blocks(model):
            _checkpoint_forward(block)
    if ctx.world_size == 1 or cfg.strategy == "none":
        return model
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return _fully_shard(model, cfg)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when `model` holds FSDP2-sharded (DTensor) parameters."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(wrapped: torch.nn.Module, skip: bool):
    """Skip gradient synchronisation inside this block when `skip` (all micro-batches but the
    last): DDP's `no_sync()`, FSDP2's `set_requires_gradient_sync(False)`. Put both the forward
    and the backward inside it."""
    if skip and is_sharded(wrapped):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    elif skip and hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    else:
        yield


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float) -> Tensor:
    """Clip the global gradient norm to `max_norm`; returns the norm before clipping (a plain
    0-dim tensor, also when the gradients are DTensor shards: their norm is reduced first)."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)  # scales each p.grad
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---------------------------------------------------------------------- collectives


def rank_state(states: list[dict], ctx: DistContext) -> dict:
    """This rank's entry of `gather_objects` output saved by a run of `len(states)` ranks.

    Same world size: the rank's own state (exact resume). Another world size (FSDP checkpoints
    reshard): rank 0's loader state with its position rescaled so that the same number of rows
    of the epoch's permutation has been consumed (exact when divisible), and no RNG states (each
    rank keeps its freshly seeded noise / dropout streams)."""
    if len(states) == ctx.world_size:
        return states[ctx.rank]
    loader = dict(states[0]["loader"])
    loader["position"] = loader["position"] * len(states) // ctx.world_size
    if ctx.is_main:
        print(
            f"resuming a {len(states)}-process checkpoint on {ctx.world_size} processes: "
            "data order continues by rows consumed; noise RNG streams restart"
        )
    return {"loader": loader}


def describe_batch(micro: int, accum: int, strategy: str, ctx: DistContext) -> str:
    """One line: the global batch = micro × accumulation × world size."""
    return (
        f"global batch {micro * accum * ctx.world_size} sequences = micro {micro} x accum {accum} "
        f"x world {ctx.world_size} (dist.strategy={strategy}, device {ctx.device})"
    )


def cleanup(ctx: DistContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
