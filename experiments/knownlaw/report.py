"""Statistics, table, plot and the docs/results.md section of the known-law benchmark.

Everything here is computed from `results` (run.py's `collect`): per model (k, seed) the NELBO,
its gap to the exact −log p(x) on the same validation rows, and per T the samples' exact
−log p(x)/L and unigram entropy. Over seeds: 95 % t-intervals (`xdlm.eval.seeds`) and paired
differences against k = 0. The hand analysis lives in results/<budget>.notes.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/seedgrid.py
from seedgrid import (  # noqa: E402
    fmt_ci,
    mean_train_wall,
    seed_summary,
    within_bound,
    write_results_section,
)

HERE = Path(__file__).resolve().parent
SECTION = "## Known law: k on a hidden Markov model with exact likelihood"
FEW_STEPS = (4, 8)


def by_k(results: dict) -> dict[float, dict[int, dict]]:
    """{k: {seed: model result}} of the evaluated models."""
    out: dict[float, dict[int, dict]] = {}
    for model in results["models"].values():
        out.setdefault(float(model["k"]), {})[int(model["seed"])] = model
    return dict(sorted(out.items()))


def metrics(model: dict, entropy: float) -> dict[str, float]:
    """The scalar metrics of one model: nelbo, gap (to −log p on the same rows), rel_gap
    (NELBO / H − 1), and per T nll@T (samples' −log p(x)/L) and ent@T (unigram entropy)."""
    like = model["likelihood"]
    out = {
        "nelbo": like["nelbo"]["nats_per_token"],
        "gap": like["gap"]["mean"],
        "rel_gap": like["nelbo"]["nats_per_token"] / entropy - 1.0,
    }
    for row in model["samples"]:
        if row["law_nll"] is not None:
            out[f"nll@{row['steps']}"] = row["law_nll"]["mean"]
        out[f"ent@{row['steps']}"] = row["unigram_entropy"]
        out[f"invalid@{row['steps']}"] = row["invalid"]
    return out


def summarize(results: dict) -> dict:
    """Per k: seeds, every metric per seed, its t-interval, and the paired difference vs k = 0
    (relative for the NELBO: NELBO_k / NELBO_0 − 1 per seed)."""
    entropy = results["reference"]["entropy"]["mean"]
    table = {k: {s: metrics(m, entropy) for s, m in sorted(seeds.items())} for k, seeds in
             by_k(results).items()}  # fmt: skip
    return seed_summary(table, "nelbo")


def likelihood_table(summary: dict, wall: dict[str, float]) -> str:
    """One row per k: NELBO, gap to the exact −log p(x), NELBO/H − 1, training wall time."""
    lines = ["| k | seeds | NELBO (nats/token) | gap to −log p(x) | NELBO / H − 1 | train min |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for k, row in summary.items():
        ci = row["ci"]
        lines.append(
            f"| {k} | {len(row['seeds'])} | {fmt_ci(ci['nelbo'])} | {fmt_ci(ci['gap'])} | "
            f"{fmt_ci(ci['rel_gap'], 1, 100.0, ' %')} | {wall[k] / 60:.1f} |"
        )
    return "\n".join(lines)


def samples_table(summary: dict, steps: list[int], metric: str, digits: int = 3) -> str:
    """One row per k, one column per T: mean [95 % CI] of `metric` (nll or ent)."""
    head = "| k | " + " | ".join(f"T = {t}" for t in steps) + " |"
    lines = [head, "|---|" + "---|" * len(steps)]
    for k, row in summary.items():
        cells = [fmt_ci(row["ci"].get(f"{metric}@{t}"), digits) for t in steps]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(summary: dict, steps: list[int]) -> str:
    """Paired differences vs k = 0 (same seed): NELBO ratio, and samples' −log p at each T."""
    head = "| k − (k = 0) | NELBO ratio − 1 | " + " | ".join(f"Δ −log p @T={t}" for t in steps)
    lines = [head + " |", "|---|---|" + "---|" * len(steps)]
    for k, row in summary.items():
        if "paired_vs_k0" not in row:
            continue
        paired = row["paired_vs_k0"]
        cells = [fmt_ci(paired.get(f"nll@{t}")) for t in steps]
        lines.append(
            f"| {k} | {fmt_ci(row['nelbo_ratio_vs_k0'], 1, 100.0, ' %')} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def answers(summary: dict, reference: dict, criterion: float) -> str:
    """The three questions and the learnable-regime criterion, stated from the numbers only."""
    h = reference["entropy"]["mean"]
    lines = []
    if (k0 := summary.get("0")) is not None:
        worst = max(k0["values"]["rel_gap"])
        met = "met" if worst <= criterion else "NOT met"
        unigram, nelbo = reference["unigram_entropy_marginal"], k0["values"]["nelbo"]
        learned = [(unigram - v) / (unigram - h) for v in nelbo]
        lines.append(
            f"- Learnable regime (k = 0 NELBO ≤ {1 + criterion:.2f} × H = "
            f"{(1 + criterion) * h:.3f} for every seed): {met}; worst seed NELBO / H − 1 = "
            f"{100 * worst:.1f} %. Share of the structure (marginal unigram entropy − H) the "
            f"k = 0 NELBO captures: {100 * min(learned):.0f}–{100 * max(learned):.0f} %."
        )
    for k, row in summary.items():
        if "paired_vs_k0" not in row:
            continue
        d, r = row["paired_vs_k0"]["nelbo"], row["nelbo_ratio_vs_k0"]
        word = "worse" if d["lo"] > 0 else ("better" if d["hi"] < 0 else "not separated")
        lines.append(
            f"- (a) k = {k} vs k = 0: ΔNELBO = {fmt_ci(d)} nats/token ({word}); "
            f"ratio − 1 = {fmt_ci(r, 2, 100.0, ' %')}."
        )
    if (x := summary.get("0.1")) is not None and "paired_vs_k0" in x:
        for t in FEW_STEPS:
            dn, de = x["paired_vs_k0"].get(f"nll@{t}"), x["paired_vs_k0"].get(f"ent@{t}")
            lines.append(
                f"- (b) T = {t}, k = 0.1 − k = 0: Δ(−log p(x)/L) = {fmt_ci(dn)}, "
                f"Δ unigram entropy = {fmt_ci(de)}."
            )
        r = x["nelbo_ratio_vs_k0"]
        within = within_bound(r, 0.05)
        lines.append(f"- (c) NELBO(0.1) / NELBO(0) − 1 = {fmt_ci(r, 2, 100.0, ' %')}: within 5 %? "
                     f"{within} (upper 95 % bound vs 5 %).")  # fmt: skip
    return "\n".join(lines)


def plot(summary: dict, reference: dict, steps: list[int], path: Path) -> None:
    """Left: NELBO / H − 1 per seed and its mean ± CI by k. Right: samples' exact −log p(x)/L
    against T per k (mean ± CI over seeds), with the law's entropy H as the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (k, row) in enumerate(summary.items()):
        vals = [100 * v for v in row["values"]["rel_gap"]]
        left.plot([i] * len(vals), vals, "o", color=f"C{i}", alpha=0.5)
        if (ci := row["ci"]["rel_gap"]) is not None:
            err = [[100 * (ci["mean"] - ci["lo"])], [100 * (ci["hi"] - ci["mean"])]]
            left.errorbar([i + 0.15], [100 * ci["mean"]], yerr=err, fmt="s", color=f"C{i}")
        cis = [row["ci"].get(f"nll@{t}") for t in steps]
        pts = [(t, c) for t, c in zip(steps, cis, strict=True) if c is not None]
        right.plot([t for t, _ in pts], [c["mean"] for _, c in pts], "o-", color=f"C{i}",
                   label=f"k = {k}")  # fmt: skip
        right.fill_between([t for t, _ in pts], [c["lo"] for _, c in pts],
                           [c["hi"] for _, c in pts], color=f"C{i}", alpha=0.2)  # fmt: skip
    left.set_xticks(range(len(summary)), [f"k = {k}" for k in summary])
    left.set_ylabel("NELBO / H − 1 (%)")
    left.set_title("likelihood gap to the true entropy (dots: seeds; squares: mean ± 95 % CI)",
                   fontsize=8)  # fmt: skip
    h = reference["entropy"]["mean"]
    right.axhline(h, color="k", ls=":", label=f"law entropy H = {h:.3f}")
    right.set_xscale("log", base=2)
    right.set_xlabel("sampling steps T")
    right.set_ylabel("samples' exact −log p(x) / L (nats)")
    right.set_title("sample quality under the true law (mean ± 95 % CI over seeds)", fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict, settings: dict, budget: str, command: str, root: Path) -> None:
    """Raw JSON (results/<budget>.json), the plot and the docs/results.md section under `root`."""
    summary = summarize(results)
    results["summary"] = summary
    raw = root / "experiments" / "knownlaw" / "results" / f"{budget}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    steps = settings["budgets"][budget]["eval"]["steps"]
    image = root / "docs" / "img" / f"knownlaw_{budget}.png"
    plot(summary, results["reference"], steps, image)
    notes = HERE / "results" / f"{budget}.notes.md"
    note = notes.read_text() if notes.is_file() else "(no analysis written yet)"
    tables = {
        "likelihood": likelihood_table(summary, mean_train_wall(results)),
        "nll": samples_table(summary, steps, "nll"),
        "ent": samples_table(summary, steps, "ent"),
        "paired": paired_table(summary, steps),
        "answers": answers(summary, results["reference"], settings["criterion"]),
    }
    text = section_text(results, settings, budget, command, tables, f"img/{image.name}")
    write_results_section(root / "docs" / "results.md", SECTION, text + "\n" + note)
    print(f"wrote {raw}, {image} and docs/results.md", flush=True)


def section_text(
    results: dict, settings: dict, budget: str, command: str, tables: dict, image: str
) -> str:
    """The markdown of the section: setup, command, machine, wall times, tables, plot, answers."""
    ref, cfg = results["reference"], settings["base"]
    spec, law = settings["budgets"][budget], settings["law"]
    train_cfg = {**cfg["train"], **spec["config"].get("train", {})}
    data_cfg = {**cfg["data"], **spec["config"].get("data", {})}
    model_cfg = {**cfg["model"], **spec["config"].get("model", {})}
    tokens = train_cfg["steps"] * data_cfg["batch_size"] * data_cfg["seq_len"]
    ev = spec["eval"]
    wall = sum(m["train"]["wall_s"] + m["eval_wall_s"] for m in results["models"].values())
    threads = ", ".join(str(t) for t in sorted({m["train"]["threads"] for m in
                                                 results["models"].values()}))  # fmt: skip
    cpu = results.get("cpu", {"cpu": "CPU not recorded", "capability": "?"})
    return f"""{SECTION}

Budget `{budget}`: {len(results["models"])} models (k × seed), each a {model_cfg["n_layers"]} × \
{model_cfg["d_model"]} DiT trained {train_cfg["steps"]} steps × {data_cfg["batch_size"]} × \
{data_cfg["seq_len"]} = {tokens / 1e6:.1f} M tokens on data drawn from a topic hidden Markov
model (`xdlm.data.synthetic.topic_hmm`: D = {law["num_tokens"]} tokens, {law["topics"]} topics
drawn once per sequence × {law["local_states"]} local states; exact log p(x) by the forward
algorithm). The law's entropy H = E[−log p(x)]/L = {ref["entropy"]["mean"]:.4f} ± \
{ref["entropy"]["se"]:.4f} nats/token (Monte Carlo over {ref["entropy"]["n"]} sequences; the
marginal unigram entropy is {ref["unigram_entropy_marginal"]:.3f}, so ≈ \
{ref["unigram_entropy_marginal"] - ref["entropy"]["mean"]:.2f} nats/token are structure).
NELBO on the first {ev["valid_rows"]} validation rows ({ev["t_samples"]} stratified t per row);
its gap to the exact −log p(x) of the same rows is paired per row. Samples: {ev["num_samples"]}
per T, ancestral sampler, temperature 1, seed {ev["seed"]}; scored with the exact −log p(x)/L
under the law (the law's own samples score {ref["samples"]["law_nll"]["mean"]:.3f}, unigram
entropy {ref["samples"]["unigram_entropy"]:.3f}). Intervals: 95 % t-intervals over seeds;
paired differences use the same seed. Settings: `experiments/knownlaw/knownlaw.yaml` (fixed
before any result); raw numbers: `experiments/knownlaw/results/{budget}.json`.

    {command}

Machine: {results["machine"]} ({cpu["cpu"]}, {cpu["capability"]}), {threads} thread(s) per
model, fp32; train + eval wall time of all models {wall / 60:.0f} min, summed over the parallel
workers (what else ran on the machine is said after "Machine").

Likelihood (95 % CI over seeds):

{tables["likelihood"]}

Samples' exact −log p(x)/L under the law (lower = more likely; the law's own samples: \
{ref["samples"]["law_nll"]["mean"]:.3f}):

{tables["nll"]}

Samples' unigram entropy (nats; the law's own samples: {ref["samples"]["unigram_entropy"]:.3f}):

{tables["ent"]}

Paired differences against k = 0 (same seed; mean [95 % CI]):

{tables["paired"]}

![known law]({image})

{tables["answers"]}
"""
