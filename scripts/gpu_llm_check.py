"""LLM-scale GPU check (≤ 10 minutes on one H100): XDLM training steps of a ~1B (0.95B) Llama-style
`HFDenoiser` under FSDP2 + activation checkpointing + bf16 mixed precision. Prints one JSON object.

    python scripts/gpu_llm_check.py                             # random 0.95B Llama, L = 2048
    python scripts/gpu_llm_check.py --fused                     # loss fused into the LM head
    python scripts/gpu_llm_check.py --model GSAI-ML/LLaDA-8B-Base --trust-remote-code \\
        --dtype bfloat16 --mask-id 126336 --batch 1             # real weights (hub or local dir)
    torchrun --standalone --nproc_per_node 8 scripts/gpu_llm_check.py      # N GPUs, sharded
    python scripts/gpu_llm_check.py --cpu-smoke                 # same path, tiny model, CPU

The model (hidden 2048, 16 layers, 32 heads, MLP 5632, V = 32,000 + 1 mask token by default) is
built from a `LlamaConfig` offline with random weights, made bidirectional by `HFDenoiser`, and
wrapped by `xdlm.train.distributed.wrap_model` (dist.strategy=fsdp, activation checkpointing,
mixed precision: bf16 parameters, fp32 reductions). `wrap_model` applies FSDP2 only when the
world size is > 1; on one process this script calls its `_fully_shard` itself so that the
sharded code path (per-block all-gather hooks, bf16 parameter casts, fp32 master weights) is
what gets measured. `--fused` uses `fused_diffusion_loss` without FSDP (as `xdlm train` does:
train.fused_loss needs dist.strategy=none) and bf16 autocast only.

Each step: one micro-batch of B random sequences of L tokens, t antithetic, z_t ~ q(· | x) with
k = 0.1, the unit-weighted loss (ℓ with −α' = 1, averaged over tokens), backward, gradient
clipping at 1, AdamW (`xdlm.builders.build_optimizer`). The first `--warmup` steps are untimed;
an out-of-memory error there halves B and retries. MFU = 6·N·tokens/s / peak per GPU, N = all
parameters (embeddings included; the recomputation of activation checkpointing is not counted).
Without CUDA it exits 2 unless `--cpu-smoke` (2 layers, width 64, V = 1000, 2 steps, gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

H100_BF16_PEAK = 989e12  # H100 SXM dense bf16 FLOP/s


@dataclass(frozen=True)
class Built:
    """The denoiser (on the device), its mask id and parameter count N."""

    model: torch.nn.Module
    mask_id: int
    params: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="hub name or local dir with real weights (default: random)")
    p.add_argument("--trust-remote-code", action="store_true", help="for --model LLaDA / Dream")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter (master weight) dtype; bfloat16 for 8B on one GPU")  # fmt: skip
    p.add_argument("--mask-id", type=int, help="default: config.mask_token_id, else a new token")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32_000, help="tokens before the mask token")
    p.add_argument("--seq-len", type=int, default=2048, help="block length L")
    p.add_argument(
        "--batch", type=int, default=8, help="sequences per step and GPU (halved on OOM)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--k", type=float, default=0.1, help="uniform share of the XDLM kernel")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--fused", action="store_true", help="fused loss (no FSDP, autocast only)")
    p.add_argument("--no-checkpointing", action="store_true", help="no activation checkpointing")
    p.add_argument("--peak", type=float, default=H100_BF16_PEAK, help="peak FLOP/s per GPU")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, 2 steps")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        tiny = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=1000, seq_len=64)
        for key, value in {**tiny, "batch": 2, "steps": 2, "warmup": 1}.items():
            setattr(args, key, value)
    return args


def init_context(args: argparse.Namespace):
    """(DistConfig, DistContext): joins torchrun's group, or starts a 1-process group itself."""
    from xdlm.config import DistConfig
    from xdlm.train import distributed as D

    cfg = DistConfig(
        strategy="none" if args.fused else "fsdp",
        activation_checkpointing=not args.no_checkpointing,
        mixed_precision=not args.fused,
    )
    device = "cpu" if args.cpu_smoke else "cuda"
    ctx = D.setup_distributed(cfg, device)
    if ctx.world_size == 1 and not args.fused and not dist.is_initialized():
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return cfg, ctx


def build_denoiser(args: argparse.Namespace, device: torch.device) -> Built:
    """A random Llama from a config (on `device` directly), or `--model` weights."""
    from transformers import LlamaConfig

    from xdlm.models.hf import HFDenoiser

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = HFDenoiser.from_pretrained(
            args.model, torch_dtype=dtype, trust_remote_code=args.trust_remote_code
        )
        mask_id = args.mask_id
        if mask_id is None:
            mask_id = getattr(model.model.config, "mask_token_id", None)
        if mask_id is None:  # a stock LM: append a mask token
            mask_id = model.vocab_size
            model.resize_vocab(mask_id + 1)
        model = model.to(device)
    else:
        config = LlamaConfig(
            vocab_size=args.vocab + 1,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            max_position_embeddings=args.seq_len,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
        with torch.device(device):
            model = HFDenoiser.from_config(config, kind="decoder").to(dtype)
        mask_id = args.vocab if args.mask_id is None else args.mask_id
    return Built(model, int(mask_id), sum(p.numel() for p in model.parameters()))


def wrap(model: torch.nn.Module, cfg, ctx) -> torch.nn.Module:
    """`wrap_model`; FSDP2 also on one process (wrap_model leaves a world of 1 unsharded)."""
    from xdlm.train import distributed as D

    wrapped = D.wrap_model(model, cfg, ctx)  # activation checkpointing; FSDP2 when world > 1
    if cfg.strategy == "fsdp" and not D.is_sharded(model):
        wrapped = D._fully_shard(model, cfg)
    return wrapped


def make_step(built: Built, wrapped: torch.nn.Module, args: argparse.Namespace, ctx):
    """A closure `step(batch) -> loss (nats/token)`: one XDLM training step (see module doc)."""
    from xdlm.builders import build_optimizer, build_schedule
    from xdlm.config import KernelConfig, TrainConfig
    from xdlm.core.fused import fused_diffusion_loss
    from xdlm.core.kernel import MixedKernel
    from xdlm.core.objective import Weighting, diffusion_loss
    from xdlm.train import distributed as D

    model, dev = built.model, ctx.device
    kernel = MixedKernel(model.vocab_size, built.mask_id, args.k)
    schedule = build_schedule(KernelConfig(k=args.k))  # log-linear, eps = 1e-3 (the recipe's)
    train = TrainConfig(lr=args.lr, weight_decay=0.1, beta1=0.9, beta2=0.95)
    opt = build_optimizer(train, model)  # after wrapping: FSDP2 parameters are DTensors
    loss_fn = fused_diffusion_loss if args.fused else diffusion_loss
    net = model if args.fused else wrapped
    gen = torch.Generator(dev).manual_seed(1000 + ctx.rank)

    def step(batch: int) -> float:
        x0 = torch.randint(
            0, kernel.vocab_size - 1, (batch, args.seq_len), generator=gen, device=dev
        )
        x0 = x0 + (x0 >= built.mask_id).long()  # real tokens never equal the mask id
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = loss_fn(net, kernel, schedule, x0, generator=gen, weighting=Weighting.UNIT,
                          rank=ctx.rank, world_size=ctx.world_size)  # fmt: skip
        (out.nats / out.tokens).backward()
        D.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (out.nats.detach() / out.tokens).item()

    return step, opt


def warm_up(step, opt, batch: int, n: int) -> tuple[int, list[float]]:
    """Run `n` untimed steps; on CUDA out-of-memory halve the batch and start again."""
    while True:
        try:
            return batch, [step(batch) for _ in range(n)]
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        # reached only after an out-of-memory error (its frames and tensors are released here)
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        batch //= 2


def measure(step, opt, args: argparse.Namespace, ctx) -> dict:
    """Warm up, then time `args.steps` steps: throughput, memory and losses."""
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    batch, losses = warm_up(step, opt, args.batch, args.warmup)
    sync()
    start = time.perf_counter()
    losses += [step(batch) for _ in range(args.steps)]
    sync()
    seconds = time.perf_counter() - start
    out = {"batch": batch, "seconds": seconds, "losses": losses}
    if batch != args.batch:
        out["batch_halved_from"] = args.batch
    return out


def describe(args: argparse.Namespace) -> str:
    return (
        f"random Llama (hidden {args.hidden}, layers {args.layers}, heads {args.heads}, "
        f"intermediate {args.intermediate}, vocab {args.vocab}+1)"
    )


def report(args: argparse.Namespace, cfg, ctx, built: Built, run: dict) -> dict:
    from xdlm.train.distributed import is_sharded

    tokens_per_step = run["batch"] * args.seq_len * ctx.world_size
    tps = tokens_per_step * args.steps / run["seconds"]
    cuda = ctx.device.type == "cuda"
    result = {
        "device": torch.cuda.get_device_name(ctx.device) if cuda else "cpu",
        "world_size": ctx.world_size,
        "model": args.model or describe(args),
        "params": built.params,
        "dtype": args.dtype,
        "fsdp2": is_sharded(built.model),
        "activation_checkpointing": cfg.activation_checkpointing,
        "mixed_precision": "fsdp2 bf16 params + autocast" if cfg.mixed_precision else "autocast",
        "fused_loss": args.fused,
        "k": args.k,
        "weighting": "unit",
        "seq_len": args.seq_len,
        "batch_per_gpu": run["batch"],
        "tokens_per_step": tokens_per_step,
        "timed_steps": args.steps,
        "step_time_s": run["seconds"] / args.steps,
        "tokens_per_s": tps,
        "tokens_per_s_per_gpu": tps / ctx.world_size,
        "assumed_peak_flops_per_gpu": args.peak,
        "mfu": 6 * built.params * tps / ctx.world_size / args.peak,
        "max_memory_gib": torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else None,
        "loss_first": run["losses"][0],
        "loss_last": run["losses"][-1],
    }
    if "batch_halved_from" in run:
        result["batch_halved_from"] = run["batch_halved_from"]
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_llm_check: no CUDA device visible; run this on a GPU machine "
              "(or pass --cpu-smoke for the tiny CPU run)", file=sys.stderr)  # fmt: skip
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg, ctx = init_context(args)
    torch.manual_seed(0)  # the same initial weights on every rank
    built = build_denoiser(args, ctx.device)
    wrapped = wrap(built.model, cfg, ctx)
    step, opt = make_step(built, wrapped, args, ctx)
    result = report(args, cfg, ctx, built, measure(step, opt, args, ctx))
    if ctx.is_main:
        print(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    finite = all(x == x and abs(x) < 1e4 for x in (result["loss_first"], result["loss_last"]))
    return 0 if finite else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    raise SystemExit(main())
