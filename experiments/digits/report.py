"""Statistics, tables, plot and the docs/results.md section of the digits benchmark.

Per model: the held-out conditional NELBO (nats per pixel) and, per sampling steps T and guidance
w, the classifier's conditional accuracy, the FID on its features and the within-class diversity
of the samples. Over seeds: 95 % t-intervals and paired differences against k = 0
(`seedgrid.seed_summary`). Hand analysis: results/<budget>.notes.md.
"""

from __future__ import annotations

import json
import shutil
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
SECTION = "## Digits: class-conditional MNIST with a 98 % classifier"
FEW_STEPS = (4, 8)
METRICS = {"acc": ("accuracy", "conditional accuracy", 3), "fid": ("fid", "FID (classifier)", 2),
           "div": ("diversity", "within-class diversity", 2)}  # fmt: skip


def cell(name: str, steps: int, w: float) -> str:
    """The metric key of one sampling cell, e.g. acc@T8w1."""
    return f"{name}@T{steps}w{w:g}"


def metrics(model: dict) -> dict[str, float]:
    """nelbo, and per (T, w): acc, fid, div (see METRICS)."""
    out = {"nelbo": model["nelbo"]["nats_per_token"]}
    for row in model["samples"]:
        for name, (field, _, _) in METRICS.items():
            if field in row:  # absent when fewer than two samples were valid
                out[cell(name, row["steps"], row["guidance"])] = row[field]
    return out


def summarize(results: dict) -> dict:
    """Per k: values per seed, t-intervals, paired differences vs k = 0 (and the NELBO ratio)."""
    table: dict[float, dict[int, dict]] = {}
    for m in results["models"].values():
        table.setdefault(float(m["k"]), {})[int(m["seed"])] = metrics(m)
    return seed_summary(table, "nelbo")


def metric_table(summary: dict, ev: dict, name: str) -> str:
    """Rows (k, w), one column per T: mean [95 % CI] of the metric `name`."""
    digits = METRICS[name][2]
    lines = ["| k | w | " + " | ".join(f"T = {t}" for t in ev["steps"]) + " |",
             "|---|---|" + "---|" * len(ev["steps"])]  # fmt: skip
    for k, row in summary.items():
        for w in ev["guidance"]:
            cells = [fmt_ci(row["ci"].get(cell(name, t, w)), digits) for t in ev["steps"]]
            lines.append(f"| {k} | {w:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def likelihood_table(summary: dict, wall: dict[str, float]) -> str:
    lines = ["| k | seeds | NELBO −log p(x \\| c) (nats/pixel) | NELBO ratio − 1 vs k = 0 | "
             "train min |", "|---|---|---|---|---|"]  # fmt: skip
    for k, row in summary.items():
        ratio = fmt_ci(row.get("nelbo_ratio_vs_k0"), 2, 100.0, " %") if k != "0" else "–"
        lines.append(f"| {k} | {len(row['seeds'])} | {fmt_ci(row['ci']['nelbo'], 4)} | "
                     f"{ratio} | {wall[k] / 60:.1f} |")  # fmt: skip
    return "\n".join(lines)


def paired_table(summary: dict, ev: dict) -> str:
    """Paired differences vs k = 0 of accuracy and FID at every (T, w)."""
    lines = ["| k − (k = 0) | w | " + " | ".join(f"Δacc / ΔFID @T={t}" for t in ev["steps"])
             + " |", "|---|---|" + "---|" * len(ev["steps"])]  # fmt: skip
    for k, row in summary.items():
        if "paired_vs_k0" not in row:
            continue
        for w in ev["guidance"]:
            d = row["paired_vs_k0"]
            cells = [f"{fmt_ci(d.get(cell('acc', t, w)))} / {fmt_ci(d.get(cell('fid', t, w)), 2)}"
                     for t in ev["steps"]]  # fmt: skip
            lines.append(f"| {k} | {w:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def answers(summary: dict, ev: dict, classifier: dict, settings: dict) -> str:
    """The classifier check, the drawn-digits criterion and (a)-(c), from the numbers only."""
    need, crit, top = (
        settings["classifier"]["min_accuracy"],
        settings["criterion"],
        max(ev["steps"]),
    )
    acc = classifier["valid_accuracy"]
    retried = "".join(  # the seeds that missed the bar before (run.train_reference_classifier)
        f"; seed {a['seed']} reached only {100 * a['valid_accuracy']:.1f} %, so seed "
        f"{classifier['seed']} was trained"
        for a in classifier.get("attempts", [])[:-1]
    )
    lines = [
        f"- Reference classifier: {100 * acc:.1f} % on the {classifier['valid_images']} "
        f"held-out digits (needed ≥ {100 * need:.0f} %: {'met' if acc >= need else 'NOT met'}"
        f"{retried})."
    ]
    cells = [(row["ci"][cell("acc", top, w)]["mean"], k, w) for k, row in summary.items()
             for w in ev["guidance"] if row["ci"].get(cell("acc", top, w))]  # fmt: skip
    if cells:
        best, k, w = max(cells)
        lines.append(f"- Digits drawn (best k conditional accuracy ≥ {crit} at T = {top}): "
                     f"{'met' if best >= crit else 'NOT met'}; best k = {k} (w = {w:g}): "
                     f"{fmt_ci(summary[k]['ci'][cell('acc', top, w)])}.")  # fmt: skip
    for k, row in summary.items():
        if "paired_vs_k0" in row:
            d = row["paired_vs_k0"]["nelbo"]
            word = "worse" if d["lo"] > 0 else ("better" if d["hi"] < 0 else "not separated")
            lines.append(f"- (a) k = {k} vs k = 0: ΔNELBO = {fmt_ci(d, 4)} nats/pixel ({word}).")
    if (x := summary.get("0.1")) is not None and "paired_vs_k0" in x:
        d = x["paired_vs_k0"]
        for t in [t for t in ev["steps"] if t in FEW_STEPS]:
            for w in ev["guidance"]:
                lines.append(
                    f"- (b) T = {t}, w = {w:g}, k = 0.1 − k = 0: Δaccuracy = "
                    f"{fmt_ci(d.get(cell('acc', t, w)))}, "
                    f"ΔFID = {fmt_ci(d.get(cell('fid', t, w)), 2)}, "
                    f"Δdiversity = {fmt_ci(d.get(cell('div', t, w)), 2)}."
                )
        r = x["nelbo_ratio_vs_k0"]
        lines.append(f"- (c) NELBO(0.1) / NELBO(0) − 1 = {fmt_ci(r, 2, 100.0, ' %')}: within 5 %? "
                     f"{within_bound(r, 0.05)} (upper 95 % bound vs 5 %).")  # fmt: skip
    return "\n".join(lines)


def plot(summary: dict, ev: dict, path: Path) -> None:
    """Left: NELBO per seed and mean ± CI by k. Middle / right: accuracy / FID against T per k
    at the largest guidance (mean ± CI over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = max(ev["guidance"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for i, (k, row) in enumerate(summary.items()):
        axes[0].plot([i] * len(row["values"]["nelbo"]), row["values"]["nelbo"], "o",
                     color=f"C{i}", alpha=0.5)  # fmt: skip
        if (ci := row["ci"]["nelbo"]) is not None:
            err = [[ci["mean"] - ci["lo"]], [ci["hi"] - ci["mean"]]]
            axes[0].errorbar([i + 0.15], [ci["mean"]], yerr=err, fmt="s", color=f"C{i}")
        for ax, name in zip(axes[1:], ("acc", "fid"), strict=True):
            pts = [(t, row["ci"].get(cell(name, t, w))) for t in ev["steps"]]
            pts = [(t, c) for t, c in pts if c is not None]
            xs = [t for t, _ in pts]
            ax.plot(xs, [c["mean"] for _, c in pts], "o-", color=f"C{i}", label=f"k = {k}")
            ax.fill_between(xs, [c["lo"] for _, c in pts], [c["hi"] for _, c in pts],
                            color=f"C{i}", alpha=0.2)  # fmt: skip
    axes[0].set_xticks(range(len(summary)), [f"k = {k}" for k in summary])
    axes[0].set_ylabel("held-out NELBO −log p(x | c) (nats/pixel)")
    for ax, name in zip(axes[1:], ("acc", "fid"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps T")
        ax.set_ylabel(f"{METRICS[name][1]} (w = {w:g})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def real_diversity(results: dict) -> float:
    """The held-out digits' own within-class diversity (the same for every model)."""
    rows = [r for m in results["models"].values() for r in m["samples"] if "real_diversity" in r]
    return rows[0]["real_diversity"] if rows else float("nan")


def copy_grids(results: dict, budget: str, img: Path) -> list[str]:
    """The seed-0 sample grid of every k into `img`; their markdown image lines."""
    lines = []
    for m in sorted(results["models"].values(), key=lambda m: m["k"]):
        if m["seed"] == 0 and Path(m["grid"]).is_file():
            name = f"digits_{budget}_k{m['k']:g}.png"
            shutil.copyfile(m["grid"], img / name)
            lines.append(f"![k = {m['k']:g}, seed 0](img/{name})")
    return lines


def report(results: dict, settings: dict, budget: str, command: str, root: Path) -> None:
    """Raw JSON, plot, grids and the docs/results.md section under `root`."""
    summary = summarize(results)
    results["summary"] = summary
    raw = root / "experiments" / "digits" / "results" / f"{budget}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    spec = settings["budgets"][budget]
    ev, img = spec["eval"], root / "docs" / "img"
    plot(summary, ev, img / f"digits_{budget}.png")
    grids = copy_grids(results, budget, img)
    notes = HERE / "results" / f"{budget}.notes.md"
    note = notes.read_text() if notes.is_file() else "(no analysis written yet)"
    model = {**settings["base"]["model"], **spec["config"].get("model", {})}
    train_cfg = {**settings["base"]["train"], **spec["config"]["train"]}
    data_cfg = {**settings["base"]["data"], **spec["config"].get("data", {})}
    images = train_cfg["steps"] * data_cfg["batch_size"]
    image = settings["data"]
    patch = image.get("patch", 1) if image.get("kind") == "patches" else 1
    tokens = f"{(image['size'] // patch) ** 2} tokens" + (
        f" of {patch} × {patch} patches" if patch > 1 else ""
    )
    positions = " with learned absolute positions" if model.get("abs_positions") else ""
    wall = sum(m["train"]["wall_s"] + m["eval_wall_s"] for m in results["models"].values())
    cpu = results["cpu"]
    text = (
        f"{SECTION}\n\nBudget `{budget}`: {len(results['models'])} models (k × seed), each a "
        f"{model['n_layers']} × {model['d_model']} class-conditional DiT{positions} trained "
        f"{train_cfg['steps']} steps × {data_cfg['batch_size']} images = {images / 9000:.1f} "
        f"epochs of the 9,000 training digits ({image['size']} × {image['size']}, "
        f"{image['levels']} grey levels, {tokens}). NELBO of "
        f"−log p(x | c) on {ev['valid_rows']} held-out digits ({ev['t_samples']} t each); "
        f"{ev['per_class']} samples per class per (T, w) (ancestral, temperature 1, seed "
        f"{ev['seed']}), scored by the reference classifier (`xdlm.eval.images.SmallCNN`, trained "
        f"on the training split only): conditional accuracy, FID on its 64-d features against "
        f"the {results['classifier']['valid_images']} held-out digits, within-class diversity "
        f"(mean pairwise feature distance). Settings: `experiments/digits/digits.yaml`; raw: "
        f"`experiments/digits/results/{budget}.json`.\n\n    {command}\n\n"
        f"Machine: {results['machine']} ({cpu['cpu']}, {cpu['capability']}), 1 thread per model, "
        f"fp32; train + eval wall time of all models {wall / 60:.0f} min summed over workers.\n\n"
        f"{likelihood_table(summary, mean_train_wall(results))}\n\n"
        f"Conditional accuracy (95 % CI over seeds):\n\n{metric_table(summary, ev, 'acc')}\n\n"
        f"FID on classifier features (lower is better):\n\n{metric_table(summary, ev, 'fid')}\n\n"
        f"Within-class diversity (real held-out digits: "
        f"{real_diversity(results):.2f}):\n\n"
        f"{metric_table(summary, ev, 'div')}\n\n"
        f"Paired differences against k = 0 (same seed):\n\n{paired_table(summary, ev)}\n\n"
        f"![digits](img/digits_{budget}.png)\n\n"
        f"Samples at T = {ev['grid_steps']}, w = {max(ev['guidance']):g} (rows: classes 0-9):\n\n"
        + "\n".join(grids)
        + f"\n\n{answers(summary, ev, results['classifier'], settings)}\n\n{note}"
    )
    write_results_section(root / "docs" / "results.md", SECTION, text)
    print(f"wrote {raw}, the plots and docs/results.md", flush=True)
