"""The one place where model and math meet: sample t, corrupt x0, call the denoiser, reduce.

    t ~ U[t_min, 1) (antithetic / stratified over the global batch),
    z_t ~ q(· | x0) = f_{α_t}(x0, ·),   loss = Σ_positions ℓ_t(x0, z_t)   (nats, summed)

Reduction is (sum of nats, number of real tokens): callers add sums across micro-batches and
ranks and divide once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule


def sample_times(
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    t_min: float = 1e-3,
    antithetic: bool = True,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    u: Tensor | None = None,
) -> Tensor:
    """t (B,) in [t_min, 1).

    Antithetic (stratified) sampling: one u ~ U[0, 1) shared by all ranks (seed the generator
    identically on every rank) and t_i = (u + i/N) mod 1 over the N = B·world_size positions of the
    global batch; rank r takes i ∈ [r·B, (r+1)·B). This lowers the variance of the NELBO estimate.
    Pass `u` to share one draw across micro-batches (gradient accumulation: index them as ranks).
    """
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    if antithetic:
        if u is None:
            u = torch.rand((), generator=generator, device=device)
        i = torch.arange(rank * batch_size, (rank + 1) * batch_size, device=device)
        t = torch.remainder(u + i / (batch_size * world_size), 1.0)
    else:
        t = torch.rand((world_size, batch_size), generator=generator, device=device)[rank]
    return t_min + (1.0 - t_min) * t


class Weighting(Enum):
    """The weight of ℓ_t: `ELBO` is the exact (−α'_t); `UNIT` replaces it by 1 (the LLM-scale
    variant used for LLaDA continual pretraining). `Weighting("elbo")` from a config string."""

    ELBO = "elbo"
    UNIT = "unit"


@dataclass(frozen=True)
class LossOutput:
    """nats: Σ ℓ over real tokens (scalar, differentiable); tokens: their count (scalar).

    per_token: ℓ_t(x0, z_t) (B, L), zero at padding; t: (B,); z_t: (B, L).
    """

    nats: Tensor
    tokens: Tensor
    per_token: Tensor
    t: Tensor
    z_t: Tensor


@dataclass(frozen=True)
class NoisyBatch:
    """A corrupted batch: t, α_t, α'_t (B,) (α' = −1 under unit weighting) and z_t (B, L)."""

    t: Tensor
    alpha: Tensor
    dalpha: Tensor
    z_t: Tensor


def corrupt_batch(
    kernel: MixedKernel,
    schedule: Schedule,
    x0: Tensor,
    *,
    attention_mask: Tensor | None = None,
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    t_min: float = 1e-3,
    antithetic: bool = True,
    rank: int = 0,
    world_size: int = 1,
    weighting: Weighting = Weighting.ELBO,
    keep_mask: Tensor | None = None,
) -> NoisyBatch:
    """Sample t (unless given), z_t ~ q(· | x0); padding and `keep_mask` tokens stay clean."""
    if not isinstance(weighting, Weighting):
        raise ValueError(
            f"weighting must be a Weighting (Weighting.ELBO or Weighting.UNIT), got "
            f"{weighting!r}; build it from a string with Weighting('elbo')"
        )
    if t is None:
        t = sample_times(
            x0.shape[0],
            generator,
            t_min=t_min,
            antithetic=antithetic,
            rank=rank,
            world_size=world_size,
            device=x0.device,
        )
    alpha = schedule.alpha(t)
    z_t = kernel.sample_marginal(x0, alpha, generator=generator)
    if attention_mask is not None:
        z_t = torch.where(attention_mask, z_t, x0)
    if keep_mask is not None:
        z_t = torch.where(keep_mask, x0, z_t)
    dalpha = schedule.dalpha(t) if weighting is Weighting.ELBO else -torch.ones_like(t)
    return NoisyBatch(t, alpha, dalpha, z_t)


def reduce_loss(per_token: Tensor, batch: NoisyBatch, counted: Tensor | None = None) -> LossOutput:
    """Zero ℓ (B, L) outside `counted` (B, L) (None = all tokens count) and sum: a LossOutput."""
    if counted is not None:
        per_token = torch.where(counted, per_token, torch.zeros_like(per_token))
        tokens = counted.sum()
    else:
        tokens = torch.tensor(per_token.numel(), device=per_token.device)
    return LossOutput(per_token.sum(), tokens, per_token, batch.t, batch.z_t)


def diffusion_loss(
    denoiser,
    kernel: MixedKernel,
    schedule: Schedule,
    x0: Tensor,
    *,
    attention_mask: Tensor | None = None,
    cond: Tensor | None = None,
    loss_mask: Tensor | None = None,
    **corruption,
) -> LossOutput:
    """Monte-Carlo NELBO of a batch x0 (B, L) with the denoiser `(z_t, t, attention_mask, cond)`.

    `corruption` are the keywords of `corrupt_batch`: t, generator, t_min, antithetic, rank,
    world_size, weighting, keep_mask. `Weighting.ELBO` uses the exact (−α'_t) weight;
    `Weighting.UNIT` replaces it by 1 (the LLM-scale variant used for LLaDA). `loss_mask`
    (B, L) restricts which tokens count (default: attention_mask); `keep_mask` (B, L) marks
    tokens that are never noised (e.g. an SFT prompt): they stay clean in z_t.
    """
    batch = corrupt_batch(kernel, schedule, x0, attention_mask=attention_mask, **corruption)
    logits = denoiser(batch.z_t, batch.t, attention_mask=attention_mask, cond=cond)
    per_token = kernel.nelbo(logits, x0, batch.z_t, batch.alpha, batch.dalpha)
    return reduce_loss(per_token, batch, loss_mask if loss_mask is not None else attention_mask)
