"""One ancestral step against the XDLM repository's (`MzeroMiko/XDLM`, loaded at run time).

    python -m benchmarks.ancestral_vs_authors [--repeats 5] [--threads 2]

Same logits (B, L, V) = (3, 288, 32000) float32, z_t with about half the positions masked,
α_t = 0.5 → α_s = 0.55, k ∈ {0.1, 0} (XDLM, MDLM). Authors: `XDMHelper.sample_one_step`
(the dense posterior (B, L, V)) + algo.py's `sample_categorical` (Gumbel-max, float32, the
default `sample_force_float64=False`); ours: `LogitFilter().probs` + `sample_posterior` (route
per position, float64 inverse CDF only on the p_θ-route rows). Interleaved, medians; peak RSS
of each case in a fresh process. Results: benchmarks/results/ancestral_vs_authors.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.common import machine, peak_rss, save
from benchmarks.upstream import XDLM_MIRROR, load_xdlm_step
from xdlm.core.kernel import MixedKernel
from xdlm.sampling.steps import LogitFilter, sample_posterior

V, B, L = 32_000, 3, 288
MASK = V - 1


def inputs(k: float):
    g = torch.Generator().manual_seed(0)
    kernel = MixedKernel(V, MASK, k)
    at, as_ = torch.full((B,), 0.5), torch.full((B,), 0.55)
    z = kernel.sample_marginal(torch.randint(MASK, (B, L), generator=g), at, generator=g)
    logits = torch.randn(B, L, V, generator=g).mul_(3.0)  # no temporary: setup RSS = live RSS
    return kernel, logits, z, at, as_


def cases(up, ks: tuple[float, ...] = (0.1, 0.0)) -> dict:
    out = {}
    for k in ks:
        kernel, logits, z, at, as_ = inputs(k)
        out[f"ours_k{k}"] = lambda a=(kernel, logits, z, at, as_): sample_posterior(
            a[0], LogitFilter().probs(a[1], MASK), *a[2:]
        )
        if up is not None:
            out[f"authors_k{k}"] = lambda a=(k, logits, z, at, as_): up.sample_categorical(
                up.XDMHelper.sample_one_step(
                    a[1], a[2], k1=a[0], mask_id=MASK, alpha_t=a[3][:, None], alpha_s=a[4][:, None]
                )
            )
    return out


def _peak(case: str, threads: int) -> dict:
    k = float(case.split("_k")[1])  # only this k's inputs exist in the probe
    setup = (
        "from benchmarks import ancestral_vs_authors as A\n"
        f"fns = A.cases(A.load_xdlm_step(), ({k},))"
    )
    return peak_rss(setup, f"fns[{case!r}]()", threads)


def bench(repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    up = load_xdlm_step()
    fns = cases(up)
    times = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    data = {"machine": machine(), "threads": threads, "repeats": repeats,
            "setting": {"V": V, "B": B, "L": L, "alpha_t": 0.5, "alpha_s": 0.55},
            "authors": f"{XDLM_MIRROR}:HEAD" if up else "absent (fetch the mirror)",
            "median_s": med, "all_s": times,
            "peak_rss": {n: _peak(n, threads) for n in fns}}  # fmt: skip
    if up is not None:
        data["ratio_ours_vs_authors"] = {
            f"k{k}": med[f"ours_k{k}"] / med[f"authors_k{k}"] for k in (0.1, 0.0)
        }
    data["load_avg_1min_end"] = os.getloadavg()[0]
    print(json.dumps({k: v for k, v in data.items() if k != "all_s"}, indent=1), flush=True)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"saved {save('ancestral_vs_authors', bench(args.repeats, args.threads))}")


if __name__ == "__main__":
    main()
