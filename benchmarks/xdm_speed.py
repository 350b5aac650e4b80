"""Speed and memory of the `xdm` sampler against the authors' `generate_xdm` (issue 30).

    python -m benchmarks.xdm_speed [--repeats 4] [--costly-repeats 3] [--threads 2] [--quick]

Setting (the paper's): B = 3 prompts of P = 32 tokens, 256 generated tokens in one block,
T = 32 steps, k = 0.1, greedy, V = 32,000. Models: `FakeLM(hidden)`, logits (B, L, V) =
(E[z_l] + E'[z_{l−1}] + E'[z_{l+1}]) · W, a cheap canvas-dependent fake (width 16, the
sampler's bookkeeping dominates) and a costlier one (lifted to 2048 features, the model
dominates). Cases run interleaved in rounds (order rotated per round), timed in wall and
process CPU seconds; ratios are medians over rounds of a case's time over the same round's
baseline time. Cases: the authors' `generate_xdm` (loaded at run time from the fetched
mirror, `benchmarks/upstream.py`; skipped with a reason when absent), ours (`XDM` with
rank_dtype "logits" and "float64"; the costly model: "logits" only) and the model alone (T
calls on one canvas). The cheap model's run also checks ours against the authors' tokens
(fp32 and bf16 logits) and measures each case's peak RSS in a fresh process. Results:
benchmarks/results/xdm_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.common import machine, peak_rss, save
from benchmarks.upstream import MIRROR, AuthorsModel, load_generate
from xdlm.core.kernel import MixedKernel
from xdlm.sampling import XDM
from xdlm.sampling.steps import Fixed

V, B, P, GEN, STEPS, K = 32_000, 3, 32, 256, 32, 0.1
MASK = V - 1


class FakeLM:
    """Deterministic logits (B, L, V) from the canvas z (B, L): a width-16 embedding of each
    token and its neighbours, optionally lifted to `hidden` features, times a head to V (the
    head's 2·B·L·hidden·V FLOPs set the cost); the [MASK] logit is −10⁴ (never predicted)."""

    def __init__(self, hidden: int | None = None, dtype: torch.dtype = torch.float32, seed=0):
        g, width = torch.Generator().manual_seed(seed), 16
        self.emb = torch.randn(V, width, generator=g).to(dtype)
        self.near = torch.randn(V, width, generator=g).to(dtype)
        self.up = None if hidden is None else torch.randn(width, hidden, generator=g).to(dtype)
        features = hidden or width
        self.head = (4.0 / features**0.5 * torch.randn(features, V, generator=g)).to(dtype)
        if self.up is not None:
            self.up /= width**0.5

    def __call__(self, z, t=None, attention_mask=None, cond=None):
        left = torch.nn.functional.pad(z[:, :-1], (1, 0), value=MASK)
        right = torch.nn.functional.pad(z[:, 1:], (0, 1), value=MASK)
        h = self.emb[z] + self.near[left] + self.near[right]
        logits = (h if self.up is None else h @ self.up) @ self.head
        logits[..., MASK] = -1e4
        return logits


def prompt_tokens() -> torch.Tensor:
    return torch.randint(MASK, (B, P), generator=torch.Generator().manual_seed(7))


def ours(model, prompt: torch.Tensor, rank_dtype: str) -> torch.Tensor:
    mask = torch.zeros(B, P + GEN, dtype=torch.bool)
    mask[:, :P] = True
    tokens = torch.zeros(B, P + GEN, dtype=torch.long)
    tokens[:, :P] = prompt
    out = XDM(rank_dtype=rank_dtype).run(
        model, MixedKernel(V, MASK, K), batch_size=B, seq_len=P + GEN, steps=STEPS,
        generator=None, fixed=Fixed(mask, tokens),
    )  # fmt: skip
    return out.tokens


def authors(gen, model, prompt: torch.Tensor) -> torch.Tensor:
    return gen.generate_xdm(
        AuthorsModel(model), prompt, steps=STEPS, gen_length=GEN, block_length=GEN,
        temperature=0.0, mask_id=MASK, k1=K,
    )  # fmt: skip


def model_only(model, prompt: torch.Tensor) -> None:
    z = torch.cat([prompt, torch.full((B, GEN), MASK)], dim=1)
    for _ in range(STEPS):
        model(z)


def cases(gen, model, prompt, cheap: bool = True) -> dict:
    """Every case for the cheap model; ours (default rank_dtype), the model alone and the
    authors' for the costly one."""
    out = {"ours_logits": lambda: ours(model, prompt, "logits")}
    if cheap:
        out["ours_float64"] = lambda: ours(model, prompt, "float64")
    out["model_only"] = lambda: model_only(model, prompt)
    if gen is not None:
        out["authors"] = lambda: authors(gen, model, prompt)
    return out


def rounds(fns: dict, repeats: int) -> dict:
    """Wall and process CPU seconds per case and round; each round runs every case once, in an
    order rotated from round to round (load changes hit all cases alike)."""
    names, out = list(fns), {name: {"wall_s": [], "cpu_s": []} for name in fns}
    loads = []
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            out[name]["cpu_s"].append(time.process_time() - cpu)
            out[name]["wall_s"].append(time.perf_counter() - wall)
        loads.append(os.getloadavg()[0])
    return {"cases": out, "load_avg_1min_per_round": loads}


def paired_ratios(times: dict, baseline: str) -> dict:
    """Median over rounds of (case time / baseline time in the same round), wall and CPU."""
    base = times[baseline]
    return {
        name: {
            clock: statistics.median(a / b for a, b in zip(t[clock], base[clock], strict=True))
            for clock in ("wall_s", "cpu_s")
        }
        for name, t in times.items()
        if name != baseline
    }


def agreement(gen, hidden: int | None) -> dict:
    """Positions where ours differs from the authors' tokens, per logits dtype and rank_dtype."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, prompt = FakeLM(hidden, dtype), prompt_tokens()
        ref = authors(gen, model, prompt)
        for rank in ("logits", "float64"):
            diff = int((ours(model, prompt, rank) != ref).sum())
            out[f"{str(dtype).split('.')[1]}_{rank}_differing_tokens"] = diff
    return out


def bench(hiddens: tuple[int | None, ...], repeats: int, costly_repeats: int, threads: int) -> dict:
    """The cheap model: every case, token agreement, peak RSS; a costlier model (hidden set):
    times of ours (default rank_dtype), the model alone and the authors'. Ratios are paired
    per round."""
    torch.set_num_threads(threads)
    gen = load_generate()
    data = {"machine": machine(), "threads": threads, "repeats": [repeats, costly_repeats],
            "setting": {"V": V, "B": B, "prompt": P, "gen": GEN, "steps": STEPS, "k": K},
            "authors": f"{MIRROR}:HEAD:generate.py" if gen else "absent (fetch the mirror)",
            "runs": []}  # fmt: skip
    for hidden in hiddens:
        model, prompt, cheap = FakeLM(hidden), prompt_tokens(), hidden is None
        fns = cases(gen, model, prompt, cheap)
        with torch.no_grad():
            measured = rounds(fns, repeats if cheap else costly_repeats)
        times = measured["cases"]
        row = {"hidden": hidden, **measured}
        row["median_s"] = {
            n: {c: statistics.median(v) for c, v in t.items()} for n, t in times.items()
        }
        row["ratio_vs_model_only"] = paired_ratios(times, "model_only")
        if "authors" in times:
            row["ratio_vs_authors"] = paired_ratios(times, "authors")
        if "authors" in times and cheap:
            row["agreement"] = agreement(gen, hidden)
        if cheap:
            setup = (
                "from benchmarks import xdm_speed as X\n"
                "fns = X.cases(X.load_generate(), X.FakeLM(), X.prompt_tokens())"
            )
            row["peak_rss"] = {n: peak_rss(setup, f"fns[{n!r}]()", threads) for n in fns}
        print(json.dumps({k: row[k] for k in row if k != "cases"}, indent=1), flush=True)
        data["runs"].append(row)
    data["load_avg_1min_end"] = os.getloadavg()[0]
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--costly-repeats", type=int, default=3, help="for the costly model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the cheap model only")
    args = parser.parse_args()
    hiddens = (None,) if args.quick else (None, 2048)
    data = bench(hiddens, args.repeats, args.costly_repeats, args.threads)
    print(f"saved {save('xdm_speed' + ('_quick' if args.quick else ''), data)}")


if __name__ == "__main__":
    main()
