"""Statistics, table, plot and the docs/results.md section of the character-level benchmark.

Per model: validation bits per token (BPC up to the BOS/EOS ids, one pair per document) and, per
T, the samples' SmolLM2 gen-PPL (as nats per scorer token) and unigram entropy. Over seeds: 95 %
t-intervals and paired differences against k = 0 (`xdlm.eval.seeds`). Hand analysis:
results/<budget>.notes.md.
"""

from __future__ import annotations

import json
import math
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
SECTION = "## Character-level text (text8-style Wikipedia leads)"


def metrics(model: dict) -> dict[str, float]:
    """bpc, and per T: gen@T (gen-PPL nats per scorer token), ent@T (unigram entropy)."""
    out = {"bpc": model["valid"]["bits_per_token"]}
    for row in model["samples"]:
        out[f"gen@{row['steps']}"] = row["gen_nats_per_token"]
        out[f"ent@{row['steps']}"] = row["unigram_entropy"]
    return out


def summarize(results: dict) -> dict:
    """Per k: values per seed, t-intervals, paired differences vs k = 0 (and the BPC ratio)."""
    table: dict[float, dict[int, dict]] = {}
    for m in results["models"].values():
        table.setdefault(float(m["k"]), {})[int(m["seed"])] = metrics(m)
    return seed_summary(table, "bpc")


def _ppl(ci: dict | None) -> str:
    """A gen-PPL interval from the interval of its log (nats per scorer token)."""
    if ci is None:
        return "–"
    return f"{math.exp(ci['mean']):.0f} [{math.exp(ci['lo']):.0f}, {math.exp(ci['hi']):.0f}]"


def tables(summary: dict, steps: list[int], wall: dict[str, float]) -> str:
    """BPC, gen-PPL and entropy per k and T, then paired differences vs k = 0."""
    head = " | ".join(f"T = {t}" for t in steps)
    lines = ["| k | seeds | BPC (bits/token) | train min |", "|---|---|---|---|"]
    for k, row in summary.items():
        lines.append(f"| {k} | {len(row['seeds'])} | {fmt_ci(row['ci']['bpc'])} | "
                     f"{wall[k] / 60:.1f} |")  # fmt: skip
    lines += ["", "gen-PPL (SmolLM2; interval from the log) / unigram entropy (nats):", "",
              f"| k | {head} |", "|---|" + "---|" * len(steps)]  # fmt: skip
    for k, row in summary.items():
        cells = [f"{_ppl(row['ci'].get(f'gen@{t}'))} / {fmt_ci(row['ci'].get(f'ent@{t}'), 2)}"
                 for t in steps]  # fmt: skip
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences against k = 0 (same seed; log gen-PPL in nats/token):", "",
              "| k − (k = 0) | BPC ratio − 1 | " + " | ".join(f"Δ log gen-PPL @{t}"
                                                           for t in steps) + " |",
              "|---|---|" + "---|" * len(steps)]  # fmt: skip
    for k, row in summary.items():
        if "paired_vs_k0" in row:
            cells = [fmt_ci(row["paired_vs_k0"].get(f"gen@{t}")) for t in steps]
            lines.append(f"| {k} | {fmt_ci(row['bpc_ratio_vs_k0'], 1, 100.0, ' %')} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def answers(summary: dict, steps: list[int]) -> str:
    """(a)-(c) from the numbers only."""
    lines = []
    for k, row in summary.items():
        if "paired_vs_k0" in row:
            d = row["paired_vs_k0"]["bpc"]
            word = "worse" if d["lo"] > 0 else ("better" if d["hi"] < 0 else "not separated")
            lines.append(f"- (a) k = {k} vs k = 0: ΔBPC = {fmt_ci(d)} ({word}).")
    if (x := summary.get("0.1")) is not None and "paired_vs_k0" in x:
        for t in [t for t in steps if t <= 8]:
            lines.append(
                f"- (b) T = {t}, k = 0.1 − k = 0: Δ log gen-PPL = "
                f"{fmt_ci(x['paired_vs_k0'].get(f'gen@{t}'))}, Δ unigram entropy = "
                f"{fmt_ci(x['paired_vs_k0'].get(f'ent@{t}'))}."
            )
        r = x["bpc_ratio_vs_k0"]
        within = within_bound(r, 0.05)
        lines.append(f"- (c) BPC(0.1) / BPC(0) − 1 = {fmt_ci(r, 2, 100.0, ' %')}: within 5 %? "
                     f"{within}.")  # fmt: skip
    return "\n".join(lines)


def plot(summary: dict, steps: list[int], path: Path) -> None:
    """Left: BPC per seed and mean ± CI by k. Right: gen-PPL against T per k (mean ± CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (k, row) in enumerate(summary.items()):
        left.plot([i] * len(row["values"]["bpc"]), row["values"]["bpc"], "o", color=f"C{i}")
        if (ci := row["ci"]["bpc"]) is not None:
            err = [[ci["mean"] - ci["lo"]], [ci["hi"] - ci["mean"]]]
            left.errorbar([i + 0.15], [ci["mean"]], yerr=err, fmt="s", color=f"C{i}", capsize=4)
        pts = [(t, row["ci"].get(f"gen@{t}")) for t in steps]
        pts = [(t, c) for t, c in pts if c is not None]
        xs = [t for t, _ in pts]
        right.plot(xs, [math.exp(c["mean"]) for _, c in pts], "o-", color=f"C{i}", label=f"k={k}")
        lo, hi = [math.exp(c["lo"]) for _, c in pts], [math.exp(c["hi"]) for _, c in pts]
        right.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.2)
    left.set_xticks(range(len(summary)), [f"k = {k}" for k in summary])
    left.set_ylabel("validation bits per character")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("sampling steps T")
    right.set_ylabel("gen-PPL (SmolLM2)")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cpu(results: dict) -> str:
    cpu = results.get("cpu", {"cpu": "CPU not recorded", "capability": "?"})
    return f"{cpu['cpu']}, {cpu['capability']}"


def report(results: dict, settings: dict, budget: str, command: str, root: Path) -> None:
    """Raw JSON, plot and the docs/results.md section under `root`."""
    summary = summarize(results)
    results["summary"] = summary
    raw = root / "experiments" / "chartext" / "results" / f"{budget}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    spec = settings["budgets"][budget]
    steps, image = spec["eval"]["steps"], root / "docs" / "img" / f"chartext_{budget}.png"
    plot(summary, steps, image)
    notes = HERE / "results" / f"{budget}.notes.md"
    note = notes.read_text() if notes.is_file() else "(no analysis written yet)"
    ev, train_cfg = spec["eval"], {**settings["base"]["train"], **spec["config"]["train"]}
    data_cfg = {**settings["base"]["data"], **spec["config"].get("data", {})}
    tokens = train_cfg["steps"] * data_cfg["batch_size"] * data_cfg["seq_len"]
    text = (
        f"{SECTION}\n\nBudget `{budget}`: {len(results['models'])} models (k × seed), "
        f"{train_cfg['steps']} steps × {data_cfg['batch_size']} × {data_cfg['seq_len']} = "
        f"{tokens / 1e6:.1f} M characters each; validation NELBO on {ev['valid_rows']} rows "
        f"({ev['t_samples']} t per row), {ev['num_samples']} samples per T (ancestral, "
        f"temperature 1). Machine: {results['machine']} ({_cpu(results)}), 1 thread per model, "
        f"fp32. Settings: "
        f"`experiments/chartext/chartext.yaml`; raw: `experiments/chartext/results/{budget}.json`."
        f"\n\n    {command}\n\n"
        + tables(summary, steps, mean_train_wall(results))
        + f"\n\n![char-level](img/{image.name})\n\n{answers(summary, steps)}\n\n{note}"
    )
    write_results_section(root / "docs" / "results.md", SECTION, text)
    print(f"wrote {raw}, {image} and docs/results.md", flush=True)
