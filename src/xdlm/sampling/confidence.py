"""Our LLM-scale XDLM variant (`confidence`): confidence-ordered unmasking plus a per-step edit
budget (greedy). The authors' algorithm is `xdm` (`xdlm.sampling.xdm`, the default for
reproduction); docs/sampling.md lists how the two differ.

Each step, from one denoiser call on z_t (B, L):

1. x̂ = argmax p_θ, c = p_θ(x̂) per position (B, L) (p_θ after the loop's logit filter; the
   default temperature 1 gives LLaDA's softmax confidence).
2. Reveal: among the free masked positions, set the n most confident ones to x̂, with
   n = ⌈M / steps_left⌉ (M = free masked positions of the sequence). This is LLaDA's
   low-confidence remasking schedule: M//T tokens per step plus one in the first M % T steps,
   so everything is revealed after T steps.
3. Edit: among the free visible positions where x̂ ≠ z_t (this excludes the tokens revealed in
   step 2), replace the `edit_budget(k, n)` = ⌊k/(1−k)·n⌋ ones with the largest margin
   p_θ(x̂) − p_θ(z_t) by x̂.

Our reading of "an edit budget of ⌊k/(1−k)·N⌋ argmax replacements per step": N is the number
of tokens revealed in this step. k/(1−k) is the forward process's ratio of uniform-noise to
masked tokens (k·β_t : (1−k)·β_t at every t), so the sampler revises tokens at the rate at which
the uniform channel corrupted them. At k = 0 the budget is 0 and the sampler is LLaDA's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from xdlm.core.kernel import MixedKernel
from xdlm.sampling.steps import Fixed, StepOutput, StepTimes


def uniform_to_mask_ratio(k: float) -> Fraction:
    """k/(1−k) exactly, from k's decimal value (0.1 -> 1/9): integer budgets without a float
    floor at integers."""
    share = Fraction(str(k))
    return share / (1 - share)


def edit_budget(k: float, n_revealed: Tensor) -> Tensor:
    """⌊k/(1−k)·N⌋ per sequence, N = tokens revealed this step, (B,) -> (B,) long; exact
    (`uniform_to_mask_ratio`)."""
    if not 0.0 <= k < 1.0:
        raise ValueError(f"the edit budget needs k in [0, 1) (a mask state), got k={k}")
    ratio = uniform_to_mask_ratio(k)
    return n_revealed.long() * ratio.numerator // ratio.denominator


def top_n(score: Tensor, n: Tensor) -> Tensor:
    """Bool (B, L): the n[b] highest finite scores of each row of score (B, L); ties by index."""
    order = score.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    return (rank < n.unsqueeze(-1)) & torch.isfinite(score)


@dataclass(frozen=True)
class Confidence:
    """Greedy confidence-ordered unmasking with ⌊k/(1−k)·N⌋ argmax edits per step.

    Deterministic (the generator is unused). Like LLaDA it starts from all-[MASK] (not from the
    XDLM prior, whose uniform-noise tokens a small edit budget could not clean up) and reveals
    every position within the T steps, so the loop applies no final step.
    """

    uses_final_step: bool = False

    def prior(
        self,
        kernel: MixedKernel,
        shape: tuple[int, int],
        generator: torch.Generator | None,
        device: str | torch.device,
    ) -> Tensor:
        """z_1 = m everywhere."""
        if kernel.mask_id is None:
            raise ValueError("the confidence sampler needs a mask state; use 'ancestral' for UDLM")
        return torch.full(shape, kernel.mask_id, dtype=torch.long, device=device)

    def step(
        self,
        kernel: MixedKernel,
        p_x0: Tensor,
        z_t: Tensor,
        times: StepTimes,
        generator: torch.Generator | None,
        fixed: Fixed,
    ) -> StepOutput:
        conf, x_hat = p_x0.max(-1)  # (B, L)
        free = ~fixed.mask.to(z_t.device)
        masked = (z_t == kernel.mask_id) & free
        n = torch.ceil(masked.sum(-1) / max(times.steps_left, 1)).long()  # (B,)
        reveal = top_n(torch.where(masked, conf, -math.inf), n)
        margin = conf - p_x0.gather(-1, z_t.unsqueeze(-1)).squeeze(-1)
        editable = ~masked & free & (x_hat != z_t)
        edit = top_n(torch.where(editable, margin, -math.inf), edit_budget(kernel.k, n))
        return StepOutput(fixed.pin(torch.where(reveal | edit, x_hat, z_t)), None)
