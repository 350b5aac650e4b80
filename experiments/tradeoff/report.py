"""Reporting for the k trade-off: per-model summary rows, the Pareto plot and the markdown table
(one `### Budget <name>` subsection of the `## Text: the k trade-off` section of docs/results.md;
everything else in that file is left untouched)."""

from __future__ import annotations

import math
import re
from pathlib import Path

SECTION = "## Text: the k trade-off"
BUDGET_HEADING = "### Budget "
INTRO = (
    "Settings, seeds and budgets: experiments/tradeoff/README.md and tradeoff.yaml, all fixed "
    "before the corresponding results were seen. One subsection per budget run."
)
PLOT_STEPS = 32


def zero_shot_mean(zero_shot: dict) -> tuple[float, float]:
    """(mean PPL over corpora, its SE): SE(PPL_c) ≈ PPL_c·SE_c(nats), combined in quadrature."""
    ppls = [v["ppl"] for v in zero_shot.values()]
    ses = [v["ppl"] * v["se_nats_per_token"] for v in zero_shot.values()]
    return sum(ppls) / len(ppls), math.sqrt(sum(s * s for s in ses)) / len(ses)


def summary_rows(results: dict) -> list[dict]:
    """One flat row per model: k, likelihoods (with SE) and gen-PPL / entropy per step count."""
    rows = []
    for name, m in results["models"].items():
        mean, se = zero_shot_mean(m["zero_shot"])
        row = {
            "model": name, "k": m["k"], "valid_ppl": m["valid"]["ppl"],
            "valid_se_nats": m["valid"]["se_nats_per_token"],
            "zero_shot_ppl": {c: v["ppl"] for c, v in m["zero_shot"].items()},
            "zero_shot_mean_ppl": mean, "zero_shot_mean_se": se,
            "gen_ppl": {r["steps"]: r["gen_ppl"] for r in m["samples"]},
            "entropy": {r["steps"]: r["unigram_entropy"] for r in m["samples"]},
            "train_wall_s": m["train"]["wall_s"], "eval_wall_s": m["eval_wall_s"]["total"],
        }  # fmt: skip
        rows.append(row)
    return rows


def plot_pareto(rows: list[dict], reference: dict, path: Path, title: str) -> Path:
    """x: gen-PPL at T = 32 (log), y: mean zero-shot PPL with SE bars; one labelled point per k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for n, r in enumerate(rows):
        x, y = r["gen_ppl"][PLOT_STEPS], r["zero_shot_mean_ppl"]
        label = f"k={r['k']:g}" + (" (no mask)" if r["model"].endswith("nomask") else "")
        label += f", H={r['entropy'][PLOT_STEPS]:.2f}"
        ax.errorbar(x, y, yerr=r["zero_shot_mean_se"], marker="o", capsize=3, color=f"C{n}",
                    label=label)  # fmt: skip
    ax.axvline(reference["gen_ppl"], color="grey", ls="--", lw=0.8)
    ax.text(reference["gen_ppl"], ax.get_ylim()[1], " real text", fontsize=7, va="top")
    ax.set_xscale("log")
    ax.set_xlabel(f"gen-PPL at T={PLOT_STEPS} ({reference['scorer']}); H = unigram entropy")
    ax.set_ylabel("zero-shot NELBO PPL (mean of 3 corpora)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, title="error bars: ±1 SE", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_section(
    results: dict, rows: list[dict], command: str, setup: str, plot: str, note: str
) -> str:
    """One budget's subsection: `### Budget <name>: <setup>`, command, wall time, the table, the
    plot and the analysis written by hand (results/<budget>.notes.md)."""
    steps = sorted(rows[0]["gen_ppl"]) if rows else []
    corpora = list(rows[0]["zero_shot_ppl"]) if rows else []
    ref = results["reference"]
    head = ["k", "valid PPL (±SE nats)"] + [f"{c} PPL" for c in corpora] + ["zero-shot mean"]
    head += [f"gen-PPL / H @{t}" for t in steps] + ["train s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['k']:g}" + (" (no mask)" if r["model"].endswith("nomask") else "")]
        cells.append(f"{r['valid_ppl']:.1f} (±{r['valid_se_nats']:.3f})")
        cells += [f"{r['zero_shot_ppl'][c]:.1f}" for c in corpora]
        cells.append(f"{r['zero_shot_mean_ppl']:.1f} ± {r['zero_shot_mean_se']:.1f}")
        cells += [f"{r['gen_ppl'][t]:.0f} / {r['entropy'][t]:.2f}" for t in steps]
        cells += [f"{r['train_wall_s']:.0f}", f"{r['eval_wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        f"{BUDGET_HEADING}{results['budget']}: {setup}", "",
        f"Command: `{command}` (raw numbers: experiments/tradeoff/results/"
        f"{results['budget']}.json). Total wall time {results['wall_s'] / 60:.1f} min on "
        f"{results['machine']}.", "",
        *lines, "",
        f"Real validation text (same {ref['samples']} rows × 128 tokens): gen-PPL "
        f"{ref['gen_ppl']:.0f}, unigram entropy {ref['unigram_entropy']:.2f} nats. gen-PPL by "
        f"{ref['scorer']} (SmolLM2-135M-Instruct Q4_1); H = mean per-sample unigram entropy "
        "(nats); PPLs are NELBO bounds (lower is better).", "",
        f"![trade-off, {results['budget']}]({plot})", "",
        note.strip(), "",
    ])  # fmt: skip


def write_section(doc: Path, budget: str, subsection: str) -> None:
    """Put `subsection` in place of `### Budget <budget>` inside the `## Text: the k trade-off`
    section of `doc` (first among the budgets if new); every other part of `doc` is kept."""
    text = doc.read_text() if doc.is_file() else "# Results\n"
    section = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if (match := section.search(text)) is None:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{INTRO}\n"
        match = section.search(text)
    body = match.group(0)
    own = re.compile(rf"^{re.escape(BUDGET_HEADING + budget)}(?=[:\n]).*?(?=^### |\Z)", re.S | re.M)
    body, replaced = own.subn(lambda _: subsection.rstrip("\n") + "\n\n", body, count=1)
    if not replaced:
        first = re.search(rf"^{re.escape(BUDGET_HEADING)}", body, re.M)
        cut = first.start() if first else len(body)
        body = body[:cut].rstrip("\n") + "\n\n" + subsection.rstrip("\n") + "\n\n" + body[cut:]
    text = text[: match.start()] + body.rstrip("\n") + "\n\n" + text[match.end() :]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")
