"""Training / validation curves of runs from their RUN/metrics.jsonl, as a PNG.

    plot_runs(["runs/mdlm", "runs/xdlm"], "curves.png")     # `xdlm plot runs/mdlm runs/xdlm`

Left: the training loss (NELBO estimate, nats/token) per logged step; right: the validation
NELBO (nats/token, EMA weights) per evaluation. One line per run, labelled by its directory.

Nats per token compare only on the same tokens: `data_mismatch(runs)` names the runs and the
fields (data: the prepared manifest's SHA-256, else data.path; tokenizer; vocab size; seq len)
in which they differ, and `xdlm plot` prints it as a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xdlm.files import read_jsonl, read_yaml
from xdlm.runs import find_checkpoint, read_meta


@dataclass(frozen=True)
class Curves:
    """One run's logged series: (steps, values) for the training loss and validation NELBO."""

    name: str
    train_steps: list[int]
    train_loss: list[float]
    valid_steps: list[int]
    valid_nats: list[float]


def read_curves(run: str | Path) -> Curves:
    """The series in RUN/metrics.jsonl; FileNotFoundError when the run has none."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory of `xdlm train`")
    records = read_jsonl(path, "a run's metrics")
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    valid = [(r["step"], r["valid_nats_per_token"]) for r in records if "valid_nats_per_token" in r]
    return Curves(
        Path(run).name or str(run),
        [s for s, _ in train], [v for _, v in train],
        [s for s, _ in valid], [v for _, v in valid],
    )  # fmt: skip


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """Write the two-panel PNG of `runs` to `out`; ValueError when no run logged anything or
    `out` is a directory or lacks an image extension (matplotlib would write `out.png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    kinds = plt.figure().canvas.get_supported_filetypes()  # png, pdf, svg, ...
    plt.close("all")
    if out.is_dir() or out.suffix.lstrip(".").lower() not in kinds:
        raise ValueError(
            f"--out {out} is {'a directory' if out.is_dir() else 'not an image file name'}; "
            f"pass a file ending in one of {', '.join('.' + k for k in sorted(kinds))}, e.g. "
            f"{out / 'curves.png' if out.is_dir() else out.with_suffix('.png')}"
        )
    curves = [read_curves(r) for r in runs]
    if not any(c.train_steps or c.valid_steps for c in curves):
        raise ValueError(f"no loss or validation record in {[str(r) for r in runs]}")
    fig = curves_figure(curves)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def curves_figure(curves: list[Curves]):
    """The matplotlib figure of `plot_runs`: left, each run's training loss against its step;
    right, its validation NELBO (EMA weights) against its step, with markers; one legend entry
    per run in each panel."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for c in curves:
        left.plot(c.train_steps, c.train_loss, label=c.name)
        right.plot(c.valid_steps, c.valid_nats, marker="o", label=c.name)
    for ax, title in ((left, "training loss"), (right, "validation NELBO (EMA)")):
        ax.set(xlabel="step", ylabel="nats / token", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def data_signature(run: str | Path) -> dict[str, str | None]:
    """What a run's nats are measured on: {"data" (path), "manifest" (its SHA-256, short),
    "tokenizer", "vocab size", "seq len"}, from its latest checkpoint's meta.json (config.yaml
    before the first); None = not recorded."""
    run = Path(run)
    try:
        meta = read_meta(find_checkpoint(run))
    except FileNotFoundError:
        config = run / "config.yaml"
        meta = {"config": read_yaml(config) or {}} if config.is_file() else {}
    data, cfg = meta.get("data", {}), meta.get("config", {}).get("data", {})
    vocab = meta.get("kernel", {}).get("vocab_size")
    manifest, tokenizer = data.get("manifest_sha256"), data.get("tokenizer_sha256")
    return {
        "data": data.get("path") or cfg.get("path"),
        "manifest": manifest[:12] if manifest else None,
        "tokenizer": tokenizer[:12] if tokenizer else None,
        "vocab size": None if vocab is None else str(vocab),
        "seq len": None if cfg.get("seq_len") is None else str(cfg["seq_len"]),
    }


def data_mismatch(runs: list[str | Path]) -> str | None:
    """One line naming the runs and each field in which they differ, or None when every
    recorded field agrees. Data is the same when the manifests' SHA-256 agree (the data paths
    when a run recorded none); a field a run did not record is not compared."""
    signatures = {str(r): data_signature(r) for r in runs}
    hashed = all(s["manifest"] for s in signatures.values())
    differ = []
    for field in ("data", "tokenizer", "vocab size", "seq len"):
        key = "manifest" if field == "data" and hashed else field
        values = {r: s[key] for r, s in signatures.items() if s[key] is not None}
        if len(set(values.values())) > 1:
            shown = {r: _shown(signatures[r], field) for r in values}
            differ.append(f"{field} " + " vs ".join(f"{v} ({r})" for r, v in shown.items()))
    if not differ:
        return None
    return (
        f"runs {', '.join(signatures)} differ in {'; '.join(differ)}: their nats/token are "
        "not on the same tokens and do not compare (train them on one prepared dataset)"
    )


def _shown(signature: dict, field: str) -> str | None:
    if field == "data" and signature["manifest"]:
        return f"{signature['data']} (manifest {signature['manifest']})"
    return signature[field]
