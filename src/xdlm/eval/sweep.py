"""Few-step quality sweep: generate at several step counts T and sampling settings, score each
cell with `sample_quality`, and draw gen-PPL against unigram entropy (the paper's trade-off plot:
lower gen-PPL is better only at an entropy close to that of real text, ≈ 5.4–5.6 nats for GPT-2
tokens at L = 1024).

    rows = sweep(model, kernel, schedule, tokenizer, scorer, steps=[4, 8, 16, 32],
                 settings=[SamplingSetting(1.0, None), SamplingSetting(1.0, 0.9)],
                 num_samples=16, seq_len=128, seed=0)
    plot_sweep(rows, "sweep.png")

Every cell draws its samples with a generator seeded by `seed`, so cells differ only by T and
the setting (paired comparison). Generation is `xdlm.sampling.loop.generate` (ancestral sampler,
the paper's t grid and final noise-removal step by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule
from xdlm.eval.genquality import Scorer, sample_quality
from xdlm.sampling.loop import generate
from xdlm.sampling.steps import LogitFilter


@dataclass(frozen=True)
class SamplingSetting:
    """Temperature and nucleus (top-p, None = off) applied to p_θ before every step."""

    temperature: float = 1.0
    top_p: float | None = None

    @property
    def label(self) -> str:
        return f"T={self.temperature:g}" + (f", top-p={self.top_p:g}" if self.top_p else "")


def generate_many(
    denoiser, kernel: MixedKernel, schedule: Schedule, *, num_samples: int, seq_len: int,
    steps: int, setting: SamplingSetting, batch_size: int, seed: int, device="cpu", **kwargs,
) -> tuple[torch.Tensor, int, float]:  # fmt: skip
    """(tokens (num_samples, L), total NFE, total wall time) in batches of `batch_size`."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"need num_samples, batch_size >= 1, got {num_samples}, {batch_size}")
    gen = torch.Generator(device).manual_seed(seed)
    filt = LogitFilter(temperature=setting.temperature, top_p=setting.top_p)
    tokens, nfe, wall = [], 0, 0.0
    for start in range(0, num_samples, batch_size):
        out = generate(
            denoiser, kernel, schedule, batch_size=min(batch_size, num_samples - start),
            seq_len=seq_len, steps=steps, generator=gen, filter=filt, device=device, **kwargs,
        )  # fmt: skip
        tokens.append(out.tokens.cpu())
        nfe, wall = nfe + out.nfe, wall + out.wall_time
    return torch.cat(tokens), nfe, wall


def sweep(
    denoiser, kernel: MixedKernel, schedule: Schedule, tokenizer, scorer: Scorer, *,
    steps: Sequence[int] = (4, 8, 16, 32, 64, 128),
    settings: Sequence[SamplingSetting] = (SamplingSetting(),), num_samples: int = 16,
    seq_len: int = 128, batch_size: int = 8, seed: int = 0, device="cpu", progress: bool = False,
    **kwargs,
) -> list[dict]:  # fmt: skip
    """One row per (setting, T): the setting, T, NFE, wall time and every `sample_quality` metric.

    `kwargs` go to `generate` (sampler, final, grid, ...); `progress` shows a tqdm bar of cells.
    """
    rows = []
    cells = [(setting, t) for setting in settings for t in steps]
    for setting, t in tqdm(cells, desc="gen-PPL sweep", disable=not progress, leave=False):
        tokens, nfe, wall = generate_many(
            denoiser, kernel, schedule, num_samples=num_samples, seq_len=seq_len, steps=t,
            setting=setting, batch_size=batch_size, seed=seed, device=device, **kwargs,
        )  # fmt: skip
        quality = sample_quality(tokens, tokenizer, scorer)
        rows.append({**asdict(setting), "steps": t, "nfe": nfe, "wall_time": wall, **quality})
    return rows


def plot_sweep(rows: Sequence[dict], path: str | Path) -> Path:
    """PNG of gen-PPL (log y) against unigram entropy, one line per setting, points labelled T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    labels = dict.fromkeys(SamplingSetting(r["temperature"], r["top_p"]).label for r in rows)
    for label in labels:
        cells = [r for r in rows if SamplingSetting(r["temperature"], r["top_p"]).label == label]
        x, y = [r["unigram_entropy"] for r in cells], [r["gen_ppl"] for r in cells]
        ax.plot(x, y, marker="o", label=label)
        for r in cells:
            ax.annotate(str(r["steps"]), (r["unigram_entropy"], r["gen_ppl"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("unigram entropy (nats)")
    ax.set_ylabel(f"gen-PPL ({rows[0]['scorer'] if rows else 'scorer'})")
    ax.set_title("gen-PPL vs entropy (labels: sampling steps T)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
