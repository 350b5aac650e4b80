"""Closed-form ∂ℓ/∂(lp_x, lp_z, S) (`stat_grads`) against `torch.func.vjp` of the same ℓ.

Both act on (n,) row vectors of one chunk; this measures which is cheaper per chunk and checks
that they agree. `python -m benchmarks.stat_grads_bench` prints and saves
benchmarks/results/stat_grads.json.
"""

from __future__ import annotations

import time

import torch
from torch.func import vjp

from benchmarks.common import machine, save
from xdlm.core.fused_chunk import RowTargets, stat_grads
from xdlm.core.kernel import MixedKernel


def targets(n: int, V: int = 50258) -> tuple[RowTargets, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    kern = MixedKernel(V, V - 1, 0.1)
    x0 = torch.randint(V - 1, (n,), generator=g)
    alpha = torch.rand(n, generator=g) * 0.9 + 0.05
    z = kern.sample_marginal(x0[None], alpha[:1], generator=g)[0]
    t = RowTargets(kern, x0, z, alpha, torch.full((n,), 0.999))
    lp_x = -torch.rand(n, generator=g) * 10
    lp_z = torch.where(z == V - 1, torch.full_like(lp_x, float("-inf")), -torch.rand(n) * 10)
    sp = torch.rand(n, generator=g) * 5 + 1
    return t, lp_x, lp_z, sp


def by_vjp(t: RowTargets, lp_x, lp_z, sp):
    def ell(a, b, c):
        return t.kernel.nelbo_from_stats(a, b, c, t.x0, t.z_t, t.alpha, t.w)

    _, pull = vjp(ell, lp_x, lp_z, sp)
    return pull(torch.ones_like(lp_x))


def best_ms(fn, repeats: int = 50) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main() -> None:
    rows = []
    for n in (64, 256, 1024):
        args = targets(n)
        closed = stat_grads(*args[:3])
        auto = by_vjp(*args)
        err = max(
            (a - b).abs().max().item()
            for a, b in zip(auto, (closed.d_x, closed.d_z, closed.d_s), strict=True)
        )
        row = {
            "rows": n,
            "closed_form_ms": best_ms(lambda a=args: stat_grads(*a[:3])),
            "vjp_ms": best_ms(lambda a=args: by_vjp(*a)),
            "max_abs_diff": err,
        }
        rows.append(row)
        print(row, flush=True)
    print(f"saved {save('stat_grads', {'machine': machine(), 'rows': rows})}")


if __name__ == "__main__":
    main()
