"""Likelihood evaluation: the NELBO bound as nats/token, bits/token and PPL, with error bars.

Two bounds on −log p_θ(x) per sequence x (B, L):

  continuous  NELBO(x) = E_{t ~ U[t_min, 1]} E_{z_t ~ q(·|x)} Σ_l ℓ_t(x, z_t)_l     (the training
              objective of `diffusion_loss`; `kernel.nelbo` gives ℓ_t). The t-expectation uses
              n_t nodes per sequence, one z_t per node:
                "stratified":     t_j = t_min + (1 − t_min)·(u + j)/n_t, u ~ U[0, 1) per sequence
                "midpoint":       t_j = t_min + (1 − t_min)·(j + ½)/n_t, weights 1/n_t
                "gauss-legendre": Gauss–Legendre nodes on [t_min, 1], weights w_j/2
  discrete-T  NELBO_T(x) = KL(q(z_1|x) ‖ r) + Σ_{i=2}^{T} E_{z_{t_i}} KL(q(z_{t_{i−1}}|z_{t_i}, x) ‖
              p_θ(z_{t_{i−1}}|z_{t_i})) + E_{z_{t_1}}[−log p_θ(x | z_{t_1})] on t_i = i/T with
              α_{t_0} = 1 (the last step is `step_kl` with α_s = 1, the reconstruction) and
              α_{t_T} = 0: the chain ends exactly at the stationary prior r, which is also where the
              sampler starts, so the prior KL is exactly 0 (with the schedule's α_1 = ε > 0 it would
              be +∞ for MDLM, k = 0, whose prior r puts no mass on data tokens).

Reproducibility: the noise of sequence number i of a split (u and every z) comes from its own
generator seeded by (seed, i), so the result does not depend on the batch size.

Estimator (documented in docs/evaluation.md): per sequence n_i = its NELBO estimate (nats) and
c_i = its real tokens; nats/token R = Σ n_i / Σ c_i (sums carried across batches, divided once);
SE(R) = sqrt(Σ (n_i − R·c_i)² / (N·(N − 1))) / c̄ (delta method for a ratio of means over
N sequences); 95% CI R ± 1.96·SE; PPL = exp(R) with CI exp(R ± 1.96·SE).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule
from xdlm.data.loader import Rows, TokenShards

METHODS = ("stratified", "midpoint", "gauss-legendre")
Z95 = 1.959963984540054


@dataclass(frozen=True)
class SequenceNats:
    """Per-sequence NELBO estimates: nats (B,) float64, tokens (B,) int64 (real tokens)."""

    nats: Tensor
    tokens: Tensor


@dataclass(frozen=True)
class LikelihoodResult:
    """A bound reduced over N sequences (module docstring for the estimator)."""

    nats_per_token: float
    bits_per_token: float
    ppl: float
    se_nats_per_token: float
    ci95_nats_per_token: tuple[float, float]
    ci95_ppl: tuple[float, float]
    nats: float
    tokens: int
    sequences: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(nats: Tensor, tokens: Tensor) -> LikelihoodResult:
    """Ratio estimator R = Σ n_i / Σ c_i over sequences, with its delta-method SE and 95% CI."""
    n, c = nats.double(), tokens.double()
    if n.numel() == 0 or c.sum() <= 0:
        raise ValueError("no tokens were evaluated; check the data split and max_batches")
    r = float(n.sum() / c.sum())
    se = float("nan")
    if n.numel() > 1:
        resid = n - r * c
        se = float(resid.pow(2).sum() / (n.numel() * (n.numel() - 1))) ** 0.5 / float(c.mean())
    lo, hi = r - Z95 * se, r + Z95 * se
    return LikelihoodResult(
        nats_per_token=r, bits_per_token=r / math.log(2), ppl=math.exp(r),
        se_nats_per_token=se, ci95_nats_per_token=(lo, hi), ci95_ppl=(math.exp(lo), math.exp(hi)),
        nats=float(n.sum()), tokens=int(c.sum()), sequences=n.numel(),
    )  # fmt: skip


def row_generators(row_ids: Tensor, seed: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sequence, seeded from (seed, global row index)."""
    out = []
    for i in row_ids.tolist():
        state = np.random.SeedSequence([seed, int(i)]).generate_state(2, dtype=np.uint32)
        out.append(torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1])))
    return out


def time_nodes(
    n: int, method: str, t_min: float, gens: list[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """Times t (B, n) in [t_min, 1] and weights w (n,) with Σ w = 1 for E_{t ~ U[t_min, 1]}."""
    if method not in METHODS:
        raise ValueError(f"unknown time method {method!r}; choose one of {METHODS}")
    if n < 1 or not 0.0 <= t_min < 1.0:
        raise ValueError(f"need t_samples >= 1 and t_min in [0, 1), got {n} and {t_min}")
    j = torch.arange(n, dtype=torch.float64)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if method == "stratified":
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
        unit = (u[:, None].cpu() + j) / n
    elif method == "midpoint":
        unit = ((j + 0.5) / n).expand(len(gens), n)
    else:
        x, wl = np.polynomial.legendre.leggauss(n)
        unit = torch.from_numpy((x + 1.0) / 2.0).expand(len(gens), n)
        w = torch.from_numpy(wl / 2.0)
    return (t_min + (1.0 - t_min) * unit).float(), w


def _noisy(kernel: MixedKernel, x0: Tensor, alpha: Tensor, gens: list) -> Tensor:
    """z (B, K, L): row b draws z_{b,j} ~ q(· | x0_b) at α = alpha[b, j] with its own generator."""
    K = alpha.shape[1]
    rows = [
        kernel.sample_marginal(x0[b].expand(K, -1), alpha[b].to(x0.device), generator=g)
        for b, g in enumerate(gens)
    ]
    return torch.stack(rows)


def _masked_sum(per_token: Tensor, attention_mask: Tensor | None) -> Tensor:
    if attention_mask is not None:
        per_token = torch.where(attention_mask, per_token, torch.zeros_like(per_token))
    return per_token.double().sum(-1)


def _tokens(x0: Tensor, attention_mask: Tensor | None) -> Tensor:
    if attention_mask is None:
        return torch.full((x0.shape[0],), x0.shape[1], dtype=torch.int64)
    return attention_mask.sum(-1).long().cpu()


@torch.no_grad()
def sequence_nelbo(
    denoiser, kernel: MixedKernel, schedule: Schedule, x0: Tensor,
    attention_mask: Tensor | None, row_ids: Tensor, *, seed: int = 0, t_samples: int = 4,
    method: str = "stratified", t_min: float = 1e-3,
) -> SequenceNats:  # fmt: skip
    """Continuous NELBO per sequence: Σ_j w_j·Σ_l ℓ_{t_j}(x0, z_{t_j}), x0 (B, L) -> (B,)."""
    gens = row_generators(row_ids, seed, x0.device)
    t, w = time_nodes(t_samples, method, t_min, gens)
    t = t.to(x0.device)
    z = _noisy(kernel, x0, schedule.alpha(t), gens)
    nats = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for j in range(t_samples):
        z_j = z[:, j] if attention_mask is None else torch.where(attention_mask, z[:, j], x0)
        logits = denoiser(z_j, t[:, j], attention_mask=attention_mask)
        tj = t[:, j]
        ell = kernel.nelbo(logits, x0, z_j, schedule.alpha(tj), schedule.dalpha(tj))
        nats += float(w[j]) * _masked_sum(ell, attention_mask)
    return SequenceNats(nats.cpu(), _tokens(x0, attention_mask))


@torch.no_grad()
def sequence_discrete_nelbo(
    denoiser, kernel: MixedKernel, schedule: Schedule, x0: Tensor,
    attention_mask: Tensor | None, row_ids: Tensor, *, steps: int, seed: int = 0,
) -> SequenceNats:  # fmt: skip
    """Discrete-T NELBO per sequence (module docstring), one z per step, x0 (B, L) -> (B,)."""
    if steps < 1:
        raise ValueError(f"the discrete bound needs steps T >= 1, got {steps}")
    B = x0.shape[0]
    grid = torch.arange(steps + 1, dtype=torch.float32, device=x0.device) / steps  # t_0..t_T
    alpha = schedule.alpha(grid)
    alpha[0], alpha[-1] = 1.0, 0.0
    gens = row_generators(row_ids, seed, x0.device)
    z = _noisy(kernel, x0, alpha[1:].expand(B, steps), gens)  # z[:, i-1] ~ q(z_{t_i} | x)
    nats = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for i in range(1, steps + 1):
        z_i = (
            z[:, i - 1] if attention_mask is None else torch.where(attention_mask, z[:, i - 1], x0)
        )
        logits = denoiser(z_i, grid[i].expand(B), attention_mask=attention_mask)
        kl = kernel.step_kl(logits, x0, z_i, alpha[i].expand(B), alpha[i - 1].expand(B))
        nats += _masked_sum(kl, attention_mask)
    return SequenceNats(nats.cpu(), _tokens(x0, attention_mask))


def sequence_bounds(
    denoiser, kernel: MixedKernel, schedule: Schedule, batches: Iterable[tuple[Tensor, Rows]],
    *, discrete_steps: int | None = None, **kwargs,
) -> SequenceNats:  # fmt: skip
    """Per-sequence bounds of every batch of (row_ids (B,), Rows), concatenated in batch order.

    `discrete_steps` = T selects the discrete-T bound (`sequence_discrete_nelbo`, which uses only
    `seed` of `kwargs`); otherwise `kwargs` go to `sequence_nelbo` (seed, t_samples, method,
    t_min). No batches give empty (0,) tensors. The one loop behind `evaluate_rows` and
    `xdlm.eval.distributed.evaluate_rows_distributed`.
    """
    device = next(iter(denoiser.parameters()), torch.empty(0)).device
    nats, tokens = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.int64)]
    for row_ids, rows in batches:
        x0 = rows.tokens.to(device)
        mask = None if rows.attention_mask is None else rows.attention_mask.to(device)
        if discrete_steps is not None:
            seq = sequence_discrete_nelbo(
                denoiser, kernel, schedule, x0, mask, row_ids, steps=discrete_steps,
                seed=kwargs.get("seed", 0),
            )  # fmt: skip
        else:
            seq = sequence_nelbo(denoiser, kernel, schedule, x0, mask, row_ids, **kwargs)
        nats.append(seq.nats)
        tokens.append(seq.tokens)
    return SequenceNats(torch.cat(nats), torch.cat(tokens))


def evaluate_rows(
    denoiser, kernel: MixedKernel, schedule: Schedule, batches: Iterable[tuple[Tensor, Rows]],
    *, discrete_steps: int | None = None, **kwargs,
) -> LikelihoodResult:  # fmt: skip
    """Reduce per-sequence bounds over `batches` of (row_ids (B,), Rows) and summarize.

    `discrete_steps` = T selects the discrete-T bound; otherwise `kwargs` go to `sequence_nelbo`
    (seed, t_samples, method, t_min). Sums are carried over batches and divided once.
    """
    seq = sequence_bounds(
        denoiser, kernel, schedule, batches, discrete_steps=discrete_steps, **kwargs
    )
    if seq.nats.numel() == 0:
        raise ValueError("no batch was evaluated; the split is empty or max_batches is 0")
    return summarize(seq.nats, seq.tokens)


def shard_batches(
    shards: TokenShards, batch_size: int, max_rows: int | None = None, progress: str | None = None
) -> Iterable[tuple[Tensor, Rows]]:
    """The first `max_rows` rows of a split in order, `batch_size` at a time (last may be short);
    `progress` names a tqdm bar on stderr (None: silent)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(shards) if max_rows is None else min(len(shards), max_rows)
    starts = range(0, n, batch_size)
    if progress is not None:
        starts = tqdm(starts, desc=progress, unit="batch", leave=False, dynamic_ncols=True)
    for start in starts:
        ids = torch.arange(start, min(start + batch_size, n))
        yield ids, shards.rows(ids)


def evaluate_split(
    denoiser, kernel: MixedKernel, schedule: Schedule, data_dir, split: str = "valid", *,
    batch_size: int = 16, max_batches: int | None = None, progress: str | None = None, **kwargs,
) -> LikelihoodResult:  # fmt: skip
    """`evaluate_rows` over the split `split` of a prepared directory (see `evaluate_rows`);
    `progress` names a tqdm bar (None: silent)."""
    shards = TokenShards(data_dir, split)
    if shards.vocab_size != kernel.vocab_size:
        raise ValueError(
            f"{data_dir} has vocab_size {shards.vocab_size} but the model has "
            f"{kernel.vocab_size}; evaluate with data prepared by the model's tokenizer"
        )
    max_rows = None if max_batches is None else max_batches * batch_size
    return evaluate_rows(
        denoiser, kernel, schedule, shard_batches(shards, batch_size, max_rows, progress), **kwargs
    )
