"""GPU check (≤ 10 minutes): bf16 training throughput and MFU of the `small` DiT, plus a DDP /
FSDP2 smoke test when more than one GPU is visible. Prints one JSON object.

    python scripts/gpu_check.py                        # 1 GPU: throughput + MFU (+ smoke if >1 GPU)
    python scripts/gpu_check.py --steps 30 --batch 32 --seq-len 1024

MFU = tokens/s · `DiT.flops_per_token(L)` / peak (H100 SXM bf16 dense: 989 TFLOP/s; `--peak`).
The smoke test runs `torchrun --nproc_per_node N` of this file with `--smoke STRATEGY`: a few
steps of a tiny DiT under DDP and FSDP2 (bf16 mixed precision, activation checkpointing), and
checks that every rank ends with the same loss. Exits 2 with a message when CUDA is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

H100_BF16_PEAK = 989e12


def throughput(steps: int, batch: int, seq_len: int, peak: float) -> dict:
    """Timed forward + backward + AdamW steps of the `small` preset under bf16 autocast."""
    from xdlm.models.dit import DiT, DiTConfig

    dev = torch.device("cuda")
    model = DiT(DiTConfig.from_preset("small", 32_768, time_conditioning=True)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    z = torch.randint(0, 32_768, (batch, seq_len), device=dev)
    t = torch.rand(batch, device=dev)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(z, t)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), z.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tps = steps * batch * seq_len / seconds
    flops = model.flops_per_token(seq_len)
    return {
        "device": torch.cuda.get_device_name(0),
        "preset": "small",
        "params": model.num_params(),
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "tokens_per_s": tps,
        "flops_per_token": flops,
        "mfu": tps * flops / peak,
        "peak_flops": peak,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def smoke(strategy: str) -> None:
    """Run under torchrun: a few steps of a tiny DiT wrapped by `wrap_model`; rank 0 prints."""
    from xdlm.config import DistConfig
    from xdlm.models.dit import DiT, DiTConfig
    from xdlm.train import distributed as D

    fsdp = strategy == "fsdp"
    cfg = DistConfig(strategy=strategy, activation_checkpointing=fsdp, mixed_precision=fsdp)
    ctx = D.setup_distributed(cfg, "cuda")
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset("tiny", 512, n_layers=4)).to(ctx.device)
    wrapped = D.wrap_model(model, cfg, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator(ctx.device).manual_seed(ctx.rank)
    for a in range(6):
        z = torch.randint(0, 512, (8, 128), device=ctx.device, generator=g)
        with D.no_sync(wrapped, a % 2 == 0):
            loss = torch.nn.functional.cross_entropy(wrapped(z).flatten(0, 1).float(), z.flatten())
            loss.backward()
        if a % 2 == 1:
            D.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    losses = D.gather_rows(loss.detach().reshape(1), ctx)
    if ctx.is_main:
        print(json.dumps({"strategy": strategy, "world": ctx.world_size, "loss": losses.tolist()}))
    D.cleanup(ctx)


def run_smoke(n_gpus: int, strategy: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(n_gpus), __file__, "--smoke", strategy]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        return {"strategy": strategy, "ok": False, "error": proc.stderr[-2000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    losses = out["loss"]  # rank-local losses differ (own data); all must be finite
    out["ok"] = all(x == x and abs(x) < 1e4 for x in losses)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--peak", type=float, default=H100_BF16_PEAK, help="peak FLOP/s for MFU")
    p.add_argument("--smoke", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run this on a GPU machine", file=sys.stderr)
        return 2
    if args.smoke:
        smoke(args.smoke)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"throughput": throughput(args.steps, args.batch, args.seq_len, args.peak)}
    n = torch.cuda.device_count()
    if n > 1:
        torch.cuda.empty_cache()
        result["smoke"] = [run_smoke(n, s) for s in ("ddp", "fsdp")]
    print(json.dumps(result, indent=2))
    failed = any(not s["ok"] for s in result.get("smoke", []))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    raise SystemExit(main())
