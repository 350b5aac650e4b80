"""Training / validation curves of runs from their RUN/metrics.jsonl, as a PNG.

    plot_runs(["runs/mdlm", "runs/xdlm"], "curves.png")     # `xdlm plot runs/mdlm runs/xdlm`

Left: the training loss (NELBO estimate, nats/token) per logged step; right: the validation
NELBO (nats/token, EMA weights) per evaluation. One line per run, labelled by its directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xdlm.files import read_jsonl


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
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for c in curves:
        left.plot(c.train_steps, c.train_loss, label=c.name)
        right.plot(c.valid_steps, c.valid_nats, marker="o", label=c.name)
    for ax, title in ((left, "training loss"), (right, "validation NELBO (EMA)")):
        ax.set(xlabel="step", ylabel="nats / token", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
