"""Per-step sampler overhead outside the network vs one forward of the `small` DiT.

reference: `kernel.posterior_probs` (B, L, V) + `sample_categorical` over every row;
lean: `xdlm.sampling.steps.sample_posterior` (route per position, p_θ rows only where needed).
Both at k = 0.1 and k = 0 (MDLM), α_t = 0.5 → α_s = 0.55, about half of the positions masked.
"""

from __future__ import annotations

import torch

from benchmarks.common import interleaved_times
from xdlm.core.categorical import sample_categorical
from xdlm.core.kernel import MixedKernel
from xdlm.models.dit import DiT, DiTConfig
from xdlm.sampling.steps import sample_posterior


def _cases(V: int, B: int, L: int) -> dict:
    g = torch.Generator().manual_seed(0)
    at, as_ = torch.full((B,), 0.5), torch.full((B,), 0.55)
    cases = {}
    for k in (0.1, 0.0):
        kern = MixedKernel(V, V - 1, k)
        z = kern.sample_marginal(torch.randint(V - 1, (B, L), generator=g), at, generator=g)
        logits = torch.randn(B, L, V, generator=g).index_fill(-1, torch.tensor([V - 1]), -1e9)
        args = (kern, torch.softmax(logits, -1), z, at, as_)
        cases[f"reference_k{k}"] = lambda a=args: sample_categorical(
            a[0].posterior_probs(*a[1:]), g
        )
        cases[f"lean_k{k}"] = lambda a=args: sample_posterior(*a, g)
    model = DiT(DiTConfig.from_preset("small", V)).eval()
    cases["network_small"] = lambda: model(z)
    return cases


def bench(quick: bool, repeats: int, B: int = 4, L: int = 128) -> list[dict]:
    rows = []
    for V in (30522,) if quick else (30522, 50258, 126464):
        with torch.no_grad():
            times = interleaved_times(_cases(V, B, L), repeats)
        rows.append({"V": V, "B": B, "L": L, "time_s": times})
        print(f"sampler V={V}: {times}", flush=True)
    return rows
