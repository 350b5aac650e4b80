"""Few-step sampling error of the ancestral sampler with an ideal denoiser, for each k, exactly.

    python experiments/oracle_steps/run.py          # a few minutes on 2 CPU cores

For two small Markov-chain data laws (D = 4 tokens, L = 4, all 256 sequences), the T-step
output law p_T of `generate(oracle)` (ancestral sampler and final step) is propagated exactly
(`xdlm.eval.oracle`) for k ∈ {0, 0.01, 0.1, 0.5, 1} and T ∈ {1, 2, 4, ..., 64}. No training and no
Monte Carlo: the numbers isolate what the kernel does to few-step sampling. Both oracles are run:
`loo` (p(x^l | z_t^{−l}), the NELBO optimum) and `mean` (p(x^l | z_t), biased for k > 0).

Writes experiments/oracle_steps/results.json and docs/img/oracle_steps.png; prints the table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import LogLinear
from xdlm.eval.oracle import EnumerableData, OracleDenoiser, divergences, exact_output_law

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KS = [0.0, 0.01, 0.1, 0.5, 1.0]
STEPS = [1, 2, 4, 8, 16, 32, 64]
D, L = 4, 4


def datasets() -> dict[str, EnumerableData]:
    """`cycle`: P(a → a+1 mod D) = 0.6, else 0.1 (strong, regular dependence); `random`: rows
    ~ Dirichlet(0.5) with seed 0 (irregular). Uniform initial token for both."""
    cycle = torch.full((D, D), 0.1, dtype=torch.float64)
    cycle[torch.arange(D), (torch.arange(D) + 1) % D] = 0.6
    torch.manual_seed(0)
    random = torch.distributions.Dirichlet(torch.full((D,), 0.5)).sample((D,)).double()
    initial = torch.full((D,), 1.0 / D, dtype=torch.float64)
    return {
        name: EnumerableData.markov(initial, p / p.sum(1, keepdim=True), L)
        for name, p in {"cycle": cycle, "random": random}.items()
    }


def kernel(k: float) -> MixedKernel:
    """k = 1 is UDLM without a mask state, as in the trade-off experiment."""
    return MixedKernel(D, None, 1.0) if k == 1.0 else MixedKernel(D + 1, D, k)


def run() -> dict:
    results = {"D": D, "L": L, "ks": KS, "steps": STEPS, "rows": []}
    for name, data in datasets().items():
        for k in KS:
            for loo in (True, False):
                start = time.perf_counter()
                oracle = OracleDenoiser(data, kernel(k), LogLinear(), leave_one_out=loo)
                for t in STEPS:
                    row = {"data": name, "k": k, "oracle": "loo" if loo else "mean", "steps": t}
                    results["rows"].append(
                        row | divergences(data.probs, exact_output_law(oracle, t))
                    )
                print(
                    f"{name} k={k:g} {'loo' if loo else 'mean'}: "
                    f"{time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    return results


def table(results: dict, oracle: str) -> str:
    """Markdown: one row per (data, k), TV at each T."""
    head = "| data | k | " + " | ".join(f"TV @{t}" for t in STEPS) + " |"
    lines = [head, "|" + "---|" * (len(STEPS) + 2)]
    for name in ("cycle", "random"):
        for k in KS:
            tv = {
                r["steps"]: r["tv"]
                for r in results["rows"]
                if (r["data"], r["k"], r["oracle"]) == (name, k, oracle)
            }
            lines.append(f"| {name} | {k:g} | " + " | ".join(f"{tv[t]:.4f}" for t in STEPS) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """TV(p_T, p) against T (log-log), one panel per data law; solid = loo, dashed = mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, name in zip(axes, ("cycle", "random"), strict=True):
        for n, k in enumerate(KS):
            for oracle, style in (("loo", "-"), ("mean", ":")):
                rows = [
                    r
                    for r in results["rows"]
                    if (r["data"], r["k"], r["oracle"]) == (name, k, oracle)
                ]
                ax.plot(
                    [r["steps"] for r in rows],
                    [r["tv"] for r in rows],
                    style,
                    marker="o",
                    ms=3,
                    color=f"C{n}",
                    label=f"k={k:g}" if oracle == "loo" else None,
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps T")
        ax.set_title(f"{name} chain (D={D}, L={L}); solid: p(x|z^-l), dotted: p(x|z)", fontsize=9)
    axes[0].set_ylabel("TV(p_T, p_data), exact")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    start = time.perf_counter()
    results = run()
    results["wall_s"] = time.perf_counter() - start
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, REPO / "docs" / "img" / "oracle_steps.png")
    print(f"leave-one-out oracle (the NELBO optimum), {results['wall_s']:.0f} s\n")
    print(table(results, "loo") + "\n\nposterior-mean oracle\n\n" + table(results, "mean"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
