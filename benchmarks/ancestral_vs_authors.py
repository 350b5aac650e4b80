"""One ancestral step against the XDLM repository's (`MzeroMiko/XDLM`, loaded at run time).

    python -m benchmarks.ancestral_vs_authors [--repeats 5] [--threads 2]

Same logits (B, L, V) = (3, 288, 32000) float32, z_t with about half the positions masked,
α_t = 0.5 → α_s = 0.55, k ∈ {0.1, 0} (XDLM, MDLM). Authors: `XDMHelper.sample_one_step`
(the dense posterior (B, L, V)) + algo.py's `sample_categorical` (Gumbel-max, float32, the
default `sample_force_float64=False`); ours: `LogitFilter().probs` + `sample_posterior` (route
per position, float64 inverse CDF only on the p_θ-route rows). ReMDM (k = 0, "cap", η =
0.008, the authors' setting): their MDLM model's `_ancestral_update_remdm` (softmax of the
model's log-probs, the dense (B, L, V) remasking posterior, `sample_categorical`) called on a
stand-in model object (linear α_t = 1 − t, a forward that returns the log-softmax of the same
logits) against ours, `LogitFilter().probs` + `ReMDM(eta=0.008).step`. Interleaved, medians;
peak RSS of each case in a fresh process. Results: benchmarks/results/ancestral_vs_authors.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch

from benchmarks.common import machine, peak_rss, save
from benchmarks.upstream import XDLM_MIRROR, load_xdlm_step
from xdlm.core.kernel import MixedKernel
from xdlm.sampling.steps import Fixed, LogitFilter, ReMDM, StepTimes, sample_posterior

V, B, L = 32_000, 3, 288
MASK = V - 1


def inputs(k: float):
    g = torch.Generator().manual_seed(0)
    kernel = MixedKernel(V, MASK, k)
    at, as_ = torch.full((B,), 0.5), torch.full((B,), 0.55)
    z = kernel.sample_marginal(torch.randint(MASK, (B, L), generator=g), at, generator=g)
    logits = torch.randn(B, L, V, generator=g).mul_(3.0)  # no temporary: setup RSS = live RSS
    return kernel, logits, z, at, as_


REMDM_ETA = 0.008  # ReMDM "cap" as the authors' code sets it (`mdlm_sampler.auto`)


def _authors_model(logits: torch.Tensor) -> SimpleNamespace:
    """What `_ancestral_update_remdm` reads of its model object: α_t = 1 − t, a forward
    returning log-probs, the sampler config ("remdm-cap", η) and the sampling flags."""
    sampler = SimpleNamespace(sampler="remdm-cap", eta=REMDM_ETA, auto=False)
    return SimpleNamespace(
        noise=lambda t: (None, 1 - t), forward=lambda x, sigma, cond=None: logits.log_softmax(-1),
        _sigma_from_alphat=lambda a: a, config=SimpleNamespace(sampling=SimpleNamespace(
            mdlm_sampler=sampler)), p_nucleus=1.0, mask_index=MASK, sample_force_float64=False,
    )  # fmt: skip


def remdm_cases(up) -> dict:
    """One ReMDM step at k = 0, ours and (with the mirror) the authors'."""
    kernel, logits, z, at, as_ = inputs(0.0)
    times = StepTimes(at, as_, steps_left=2)
    out = {"ours_remdm": lambda: ReMDM(eta=REMDM_ETA).step(
        kernel, LogitFilter().probs(logits, MASK), z, times, None, Fixed.none(z))}  # fmt: skip
    if up is not None and up.remdm_update is not None:
        model, t = _authors_model(logits), (1 - at)[:, None]
        out["authors_remdm"] = lambda: up.remdm_update(model, z, t, 0.05)
    return out


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
    if case.endswith("remdm"):
        made = "A.remdm_cases(A.load_xdlm_step())"
    else:  # only this k's inputs exist in the probe
        made = f"A.cases(A.load_xdlm_step(), ({float(case.split('_k')[1])},))"
    setup = f"from benchmarks import ancestral_vs_authors as A\nfns = {made}"
    return peak_rss(setup, f"fns[{case!r}]()", threads)


def bench(repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    up = load_xdlm_step()
    fns = {**cases(up), **remdm_cases(up)}
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
        if "authors_remdm" in med:
            data["ratio_ours_vs_authors"]["remdm"] = med["ours_remdm"] / med["authors_remdm"]
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
