"""Statistics, tables, plot and the docs/results.md section of the few-step frontier on digits.

Computed from `results` (digits.py's `collect`): one row per (method, k, T, seed) with the NFE
and the reference classifier's scores of the samples: conditional accuracy, FID on its features
and within-class diversity. Over seeds: 95 % t-intervals and, per method and T, paired
differences against the ancestral sampler of the same model (`report.summarize`). The goal of
issue 31 on digits, judged on the intervals: at T = 4, accuracy ≥ 0.9 with FID ≤ 1.2 × the FID of
the same model's ancestral T = 32 samples (the ratio taken per seed). Hand analysis:
results/<budget>.notes.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/seedgrid.py
from seedgrid import fmt_ci, load_module, within_bound, write_results_section  # noqa: E402

from xdlm.eval.seeds import t_interval  # noqa: E402

frontier = load_module("fewstep_report", HERE / "report.py")  # the known-law frontier's report
METHODS, MIN_SEEDS, cells, summarize = (frontier.METHODS, frontier.MIN_SEEDS, frontier.cells,
                                        frontier.summarize)  # fmt: skip
SECTION = "## Few-step frontier on digits"
FIELDS = {"accuracy": "accuracy", "fid": "fid", "diversity": "diversity"}
GOAL = {"steps": 4, "reference_steps": 32, "accuracy": 0.9, "fid_ratio": 1.2}


def digits_summary(rows: list[dict]) -> list[dict]:
    """`report.summarize` over accuracy, FID and diversity, each paired with ancestral."""
    return summarize(rows, FIELDS, paired=tuple(FIELDS))


def frontier_table(summary: list[dict]) -> str:
    """Markdown: one line per (method, k, T)."""
    lines = [
        "| method | k | T | NFE | accuracy | FID | diversity | Δacc vs ancestral | "
        "ΔFID vs ancestral |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(summary, key=lambda r: (order.get(r["method"], 9), r["k"], r["steps"])):
        lines.append(
            f"| {r['method']} | {r['k']:g} | {r['steps']} | {r['nfe']:.0f} | "
            f"{fmt_ci(r['accuracy'])} | {fmt_ci(r['fid'], 1)} | {fmt_ci(r['diversity'], 2)} | "
            f"{fmt_ci(r.get('accuracy_vs_ancestral'))} | {fmt_ci(r.get('fid_vs_ancestral'), 1)} |"
        )
    return "\n".join(lines)


def fid_ratio(rows: list[dict], method: str, k: float) -> dict | None:
    """t-interval over seeds of FID(method, T = 4) / FID(ancestral, T = 32) of the same model;
    None unless MIN_SEEDS seeds have both."""
    table = cells(rows)
    mine = table.get((method, k, GOAL["steps"]), {})
    ref = table.get(("ancestral", k, GOAL["reference_steps"]), {})
    seeds = sorted(set(mine) & set(ref))
    if len(seeds) < MIN_SEEDS:
        return None
    return t_interval([mine[s]["fid"] / ref[s]["fid"] for s in seeds]).to_dict()


def at_least(ci: dict, bound: float) -> str:
    """ "yes" if the whole interval is ≥ bound, "no" if it is all below, else "undecided"."""
    return "yes" if ci["lo"] >= bound else ("no" if ci["hi"] < bound else "undecided")


def goal_lines(summary: list[dict], rows: list[dict]) -> str:
    """Per (method, k) measured at T = 4 with MIN_SEEDS seeds: accuracy ≥ 0.9? FID ≤ 1.2 × the
    ancestral T = 32 FID? Both on 95 % intervals; the goal is met only if both are."""
    out = []
    for r in summary:
        if r["steps"] != GOAL["steps"] or len(r["seeds"]) < MIN_SEEDS:
            continue
        ratio = fid_ratio(rows, r["method"], r["k"])
        if ratio is None:
            continue
        acc, fid = at_least(r["accuracy"], GOAL["accuracy"]), within_bound(ratio, GOAL["fid_ratio"])
        met = "yes" if acc == fid == "yes" else ("no" if "no" in (acc, fid) else "undecided")
        out.append(
            f"- Goal, {r['method']} (k = {r['k']:g}, T = 4, NFE {r['nfe']:.0f}): accuracy "
            f"{fmt_ci(r['accuracy'])} ≥ 0.9? **{acc}**; FID / FID(ancestral, T = 32) = "
            f"{fmt_ci(ratio, 2)} ≤ 1.2? **{fid}**; goal met? **{met}**."
        )
    return "\n".join(out) or "- Goal (T = 4 against ancestral T = 32, 3 seeds): not measured."


def plot(summary: list[dict], real_diversity: float, path: Path) -> None:
    """Accuracy, FID and within-class diversity against NFE per (method, k) (mean ± 95 % CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, method in enumerate(METHODS):
        for k, ls in ((0.0, "--"), (0.1, "-")):
            pts = sorted((r for r in summary if (r["method"], r["k"]) == (method, k)
                          and r["accuracy"]), key=lambda r: r["nfe"])  # fmt: skip
            if not pts:
                continue
            x = [r["nfe"] for r in pts]
            for ax, key in zip(axes, FIELDS, strict=True):
                ax.plot(x, [r[key]["mean"] for r in pts], ls, marker="o", color=f"C{i}",
                        label=f"{method}, k = {k:g}")  # fmt: skip
                ax.fill_between(x, [r[key]["lo"] for r in pts], [r[key]["hi"] for r in pts],
                                color=f"C{i}", alpha=0.12)  # fmt: skip
    axes[0].axhline(GOAL["accuracy"], color="k", ls=":", label="goal 0.9")
    axes[2].axhline(real_diversity, color="grey", ls=":", label="held-out digits")
    names = ("conditional accuracy", "FID (classifier features)", "within-class diversity")
    for ax, name in zip(axes, names, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE (denoiser calls per image, w = 1 counts 2 a step)")
        ax.set_ylabel(name)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Few-step frontier on digits (mean ± 95 % CI over seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict, settings: dict, budget: str, command: str, root: Path) -> None:
    """Raw JSON (results/<budget>.json), the plot and the docs/results.md section under `root`."""
    rows = results["rows"]
    summary = digits_summary(rows)
    shown = [r for r in summary if len(r["seeds"]) >= MIN_SEEDS]
    spec = settings["budgets"][budget]
    ev = {key: spec["eval"][key] for key in ("per_class", "guidance", "seed")}
    kept = {key: spec[key] for key in ("distill", "methods", "samplers")}
    results.update(summary=summary, settings={"teacher": spec["config"], "eval": ev, **kept})
    raw = root / "experiments" / "fewstep" / "results" / f"{budget}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    real_div = next((r["real_diversity"] for r in rows if "real_diversity" in r), float("nan"))
    image = root / "docs" / "img" / f"fewstep_{budget}.png"
    plot(shown, real_div, image)
    notes = HERE / "results" / f"{budget}.notes.md"
    note = notes.read_text() if notes.is_file() else "(no analysis written yet)"
    s, d, train = spec["samplers"], spec["distill"], spec["config"]["train"]
    train_min = sum(t["wall_s"] for t in results["teachers"].values()) / 60
    sample_min = sum(r["wall_s"] for r in rows) / 60
    text = f"""{SECTION}

Issue 31, on the digits of `## Digits` (14 × 14, 4 grey levels). Teachers: the digits experiment's
class-conditional 2 × 128 DiT (its `cpu-2500` recipe) trained {train["steps"]} steps (budget
`{budget}`, `experiments/fewstep/digits.yaml`), k = 0 (MDLM) and k = 0.1 (XDLM), seeds
{sorted({r["seed"] for r in rows})}. Methods as in the known-law frontier: `ancestral`, `pc`
(η = {s["pc_eta"]}), `threshold` (τ = {s["threshold"]}, revise margin {s["threshold_revise"]}, no
re-masking), `threshold-remask` (re-masking below {s["threshold_remask"]}), `distilled` (students
of `xdlm distill`, rounds {d["rounds"]} × {d["steps_per_round"]} steps, ancestral sampler),
`dilated` (planned reveals in van der Corput order of the raster, from p_θ, doubling grid) and
`dilated-final` (the same grid stopped at t_end = 0.25: the final step reveals the last
quarter and, for k > 0, revises).
Each cell: {ev["per_class"]} samples per class per model with guidance w = {ev["guidance"]:g}
(NFE counts both passes), scored by the reference classifier
({100 * results["classifier"]["valid_accuracy"]:.1f} % on held-out digits): conditional accuracy,
FID on its features against the {results["classifier"]["valid_images"]} held-out digits,
within-class diversity (held-out digits: {real_div:.2f}); 95 % t-intervals over seeds; Δ is the
paired difference to the ancestral sampler of the same model at the same T. Only cells with
{MIN_SEEDS} seeds are shown; raw rows: `experiments/fewstep/results/{budget}.json`.

    {command}

Machine: {results.get("machine", "?")}; {results.get("cpu", {}).get("cpu", "CPU not recorded")};
1 thread per model. Wall time summed over models: teachers' training {train_min:.0f} min,
sampling and scoring {sample_min:.0f} min (the students' rounds: notes below).

{frontier_table(shown)}

![few-step frontier on digits](img/{image.name})

{goal_lines(shown, rows)}
"""
    write_results_section(root / "docs" / "results.md", SECTION, text + "\n" + note)
    print(f"wrote {raw}, {image} and docs/results.md", flush=True)
