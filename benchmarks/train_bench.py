"""Training-step throughput and MFU of DiT presets on this CPU: eager vs compile, fp32 vs bf16.

One step = `diffusion_loss` (k = 0.1, log-linear) forward + backward + AdamW. MFU =
tokens/s · `DiT.flops_per_token(L)` / peak, the peak being the matmul GFLOP/s of the same dtype
measured in the same run (`common.matmul_peak_gflops`).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import best_time
from xdlm.core.kernel import MixedKernel
from xdlm.core.objective import diffusion_loss
from xdlm.core.schedules import make_schedule
from xdlm.models.dit import DiT, DiTConfig

V = 50258
SHAPES = {"tiny": (8, 128), "small": (4, 128)}


def _step_fn(preset: str, compiled: bool, bf16: bool):
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset(preset, V))
    net = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kern, sched = MixedKernel(V, V - 1, 0.1), make_schedule("loglinear")
    B, L = SHAPES[preset]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(V - 1, (B, L), generator=g)

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = diffusion_loss(net, kern, sched, x0, generator=g)
        (out.nats / out.tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, B * L


def bench(quick: bool, steps: int, peaks: dict[str, float]) -> list[dict]:
    configs = [("tiny", False, False), ("tiny", False, True)]
    if not quick:
        configs += [("tiny", True, False), ("tiny", True, True)]
        configs += [("small", False, False), ("small", False, True)]
        configs += [("small", True, False), ("small", True, True)]
    rows = []
    for preset, compiled, bf16 in configs:
        model, step, tokens = _step_fn(preset, compiled, bf16)
        start = time.perf_counter()
        step()  # warm-up (and compilation)
        first = time.perf_counter() - start
        dt = best_time(step, steps)
        peak = peaks["bf16" if bf16 else "fp32"]
        tps = tokens / dt
        mfu = tps * model.flops_per_token(SHAPES[preset][1]) / (peak * 1e9)
        row = {
            "preset": preset,
            "compile": compiled,
            "bf16": bf16,
            "step_s": dt,
            "first_step_s": first,
            "tokens_per_s": tps,
            "mfu": mfu,
        }
        rows.append(row)
        print(f"train {row}", flush=True)
    return rows
