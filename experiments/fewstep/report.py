"""Statistics, tables, plot and the docs/results.md section of the few-step frontier.

Computed from `results` (run.py's `collect`): one row per (method, k, T, seed) with the NFE, the
samples' exact −log p(x)/L under the law (`nll_per_token`) and their unigram entropy. Over seeds:
95 % t-intervals (`xdlm.eval.seeds`) and, per method and T, the paired difference against the
ancestral sampler of the same model. The hand analysis lives in results/<budget>.notes.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/seedgrid.py
from seedgrid import fmt_ci, within_bound, write_results_section  # noqa: E402

from xdlm.eval.seeds import paired_difference, t_interval  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Few-step frontier on the known law: samplers and distilled students"
METHODS = ("ancestral", "pc", "threshold", "threshold-remask", "distilled", "dilated",
           "dilated-final", "dilated-uniform", "dilated-t")  # fmt: skip
ABLATIONS = ("dilated-uniform", "dilated-t")  # in the tables, not in the plot
GOAL = {"k": 0.1, "steps": 4, "nll": 2.91, "entropy_tol": 0.05}
MIN_SEEDS = 3  # cells with fewer seeds stay in the raw JSON, not in the tables / plot


def cells(rows: list[dict]) -> dict[tuple[str, float, int], dict[int, dict]]:
    """{(method, k, T): {seed: row}}."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["method"], float(r["k"]), int(r["steps"])), {})[int(r["seed"])] = r
    return out


def summarize(rows: list[dict], fields: dict[str, str] | None = None,
              paired: tuple[str, ...] = ("nll",)) -> list[dict]:  # fmt: skip
    """Per (method, k, T): seeds, mean NFE, t-intervals of every measurement `fields` = {name:
    row key} (default nll / entropy; None under two seeds) and, for each name in `paired`, the
    paired difference against the ancestral sampler (same k, T, seed) as `<name>_vs_ancestral`."""
    fields = fields or {"nll": "nll_per_token", "entropy": "unigram_entropy"}
    table, out = cells(rows), []
    for (method, k, steps), by_seed in sorted(table.items()):
        seeds = sorted(by_seed)
        row = {"method": method, "k": k, "steps": steps, "seeds": seeds,
               "nfe": sum(by_seed[s]["nfe"] for s in seeds) / len(seeds)}  # fmt: skip
        for name, key in fields.items():
            values = [by_seed[s][key] for s in seeds]
            row[name] = t_interval(values).to_dict() if len(seeds) > 1 else None
        base = table.get(("ancestral", k, steps), {})
        shared = [s for s in seeds if s in base]
        if method != "ancestral" and len(shared) > 1:
            for name in paired:
                row[f"{name}_vs_ancestral"] = paired_difference(
                    [by_seed[s][fields[name]] for s in shared],
                    [base[s][fields[name]] for s in shared],
                ).to_dict()
        out.append(row)
    return out


def frontier_table(summary: list[dict]) -> str:
    """Markdown: one line per (method, k, T)."""
    lines = [
        "| method | k | T | NFE | −log p(x)/L | unigram entropy | Δ vs ancestral (same T) |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(summary, key=lambda r: (order.get(r["method"], 9), r["k"], r["steps"])):
        lines.append(
            f"| {r['method']} | {r['k']:g} | {r['steps']} | {r['nfe']:.1f} | {fmt_ci(r['nll'])} "
            f"| {fmt_ci(r['entropy'])} | {fmt_ci(r.get('nll_vs_ancestral'))} |"
        )
    return "\n".join(lines)


def goal_lines(summary: list[dict], law_entropy: float) -> str:
    """Per method: XDLM (k = 0.1) at T = 4 against the goal (≤ 2.91 nats/token, entropy within
    0.05 nats of the law's samples), judged on the 95 % intervals."""
    out = []
    for r in summary:
        if (r["k"], r["steps"]) != (GOAL["k"], GOAL["steps"]) or r["nll"] is None:
            continue
        nll, ent = r["nll"], r["entropy"]
        quality = within_bound(nll, GOAL["nll"])
        lo, hi = law_entropy - GOAL["entropy_tol"], law_entropy + GOAL["entropy_tol"]
        inside = "yes" if lo <= ent["lo"] and ent["hi"] <= hi else (
            "no" if ent["hi"] < lo or ent["lo"] > hi else "undecided")  # fmt: skip
        out.append(
            f"- Goal, {r['method']} (k = 0.1, T = 4, NFE {r['nfe']:.1f}): −log p(x)/L = "
            f"{fmt_ci(nll)} ≤ 2.91? **{quality}**; entropy {fmt_ci(ent)} within "
            f"[{lo:.3f}, {hi:.3f}]? **{inside}**."
        )
    return "\n".join(out) or "- Goal (k = 0.1, T = 4, ≥ 2 seeds): not measured in this budget."


def plot(summary: list[dict], reference: dict, path: Path) -> None:
    """Left: −log p(x)/L against NFE per (method, k) (mean ± 95 % CI). Right: the samples'
    unigram entropy against NFE, with the law's own samples as the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {0.0: "--", 0.1: "-"}
    for i, method in enumerate(METHODS):
        if method in ABLATIONS:
            continue
        for k, ls in styles.items():
            mine = [r for r in summary if r["method"] == method and r["k"] == k and r["nll"]]
            pts = sorted(mine, key=lambda r: r["nfe"])
            if not pts:
                continue
            x = [r["nfe"] for r in pts]
            for ax, key in ((left, "nll"), (right, "entropy")):
                ax.plot(x, [r[key]["mean"] for r in pts], ls, marker="o", color=f"C{i}",
                        label=f"{method}, k = {k:g}")  # fmt: skip
                ax.fill_between(x, [r[key]["lo"] for r in pts], [r[key]["hi"] for r in pts],
                                color=f"C{i}", alpha=0.12)  # fmt: skip
    left.axhline(GOAL["nll"], color="k", ls=":", label="goal 2.91")
    left.axhline(reference["samples"]["law_nll"]["mean"], color="grey", ls=":",
                 label="law's own samples")  # fmt: skip
    right.axhline(reference["samples"]["unigram_entropy"], color="grey", ls=":",
                  label="law's own samples")  # fmt: skip
    for ax, name in ((left, "samples' exact −log p(x) / L (nats)"), (right, "unigram entropy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE (denoiser calls per sequence)")
        ax.set_ylabel(name)
    left.legend(fontsize=7, ncol=2)
    fig.suptitle("Few-step frontier on the known law (mean ± 95 % CI over seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict, settings: dict, budget: str, command: str, root: Path) -> None:
    """Raw JSON (results/<budget>.json), the plot and the docs/results.md section under `root`."""
    summary = summarize(results["rows"])
    shown = [r for r in summary if len(r["seeds"]) >= MIN_SEEDS]
    spec = settings["budgets"][budget]
    keys = ("distill", "eval", "methods", "samplers")
    results.update(summary=summary, settings={key: spec[key] for key in keys})
    raw = root / "experiments" / "fewstep" / "results" / f"{budget}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    image = root / "docs" / "img" / f"fewstep_{budget}.png"
    plot(shown, results["reference"], image)
    notes = HERE / "results" / f"{budget}.notes.md"
    note = notes.read_text() if notes.is_file() else "(no analysis written yet)"
    ref = results["reference"]
    law_ent = ref["samples"]["unigram_entropy"]
    text = f"""{SECTION}

Issue 31. Teachers: the known-law models (`experiments/knownlaw`, same law, data and 2 × 128
DiT) with the training of `experiments/fewstep/fewstep.yaml` (budget `{budget}`), k = 0 (MDLM)
and k = 0.1 (XDLM), seeds {sorted({r["seed"] for r in results["rows"]})}. Methods: `ancestral`
(exact posterior + noise-removal step), `pc` (predictor–corrector, η = \
{spec["samplers"]["pc_eta"]}), `threshold` (τ = {spec["samplers"]["threshold"]}, revise margin
{spec["samplers"]["threshold_revise"]}, no re-masking), `threshold-remask` (the same, re-masking
visible tokens below {spec["samplers"]["threshold_remask"]}), `distilled` (students of
`xdlm distill`, rounds {spec["distill"]["rounds"]} × {spec["distill"]["steps_per_round"]} steps,
ancestral sampler), `dilated` (planned reveals in van der Corput order, from p_θ only, on the
doubling grid; docs/sampling.md), `dilated-final` (the same grid stopped at t_end = 0.25,
α ≈ 3/4: the final step reveals the last quarter and, for k > 0, revises visible tokens) and
the ablations `dilated-uniform` (the posterior's uniform route kept) and `dilated-t` (the
uniform-t grid).
Each cell: {spec["eval"]["num_samples"]} samples per model, scored with the exact −log p(x)/L
under the law (the law's own samples: {ref["samples"]["law_nll"]["mean"]:.3f}, unigram entropy
{law_ent:.3f}; entropy rate H = {ref["entropy"]["mean"]:.4f}); 95 % t-intervals over seeds; Δ is
the paired difference to the ancestral sampler of the same model at the same T. Only cells with
{MIN_SEEDS} seeds are shown; raw rows (all cells): `experiments/fewstep/results/{budget}.json`.

    {command}

Machine: {results.get("machine", "?")}; {results.get("cpu", {}).get("cpu", "CPU not recorded")}.

{frontier_table(shown)}

![few-step frontier](img/{image.name})

{goal_lines(shown, law_ent)}
"""
    write_results_section(root / "docs" / "results.md", SECTION, text + "\n" + note)
    print(f"wrote {raw}, {image} and docs/results.md", flush=True)
