"""A sampling trajectory and its XDLM transitions.

Between two consecutive states z → z' every position is in one of four cases:

    unchanged    z' = z
    revealed     z = m, z' ≠ m          (the mask channel; the only move at k = 0)
    revised      z ≠ m, z' ∉ {z, m}     (the uniform channel: a visible token replaced)
    re-masked    z ≠ m, z' = m          (k > 0 ancestral steps, or ReMDM)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

UNCHANGED, REVEALED, REVISED, REMASKED = 0, 1, 2, 3
TRANSITIONS = {REVEALED: "revealed", REVISED: "revised", REMASKED: "re-masked"}


def classify(z: Tensor, z_next: Tensor, mask_id: int | None) -> Tensor:
    """Transition codes (…, L) int8 for z → z_next (both (…, L)): 0/1/2/3 as above."""
    is_m = torch.zeros_like(z, dtype=torch.bool) if mask_id is None else z == mask_id
    next_m = torch.zeros_like(z, dtype=torch.bool) if mask_id is None else z_next == mask_id
    code = torch.zeros(z.shape, dtype=torch.int8, device=z.device)
    code[is_m & ~next_m] = REVEALED
    code[~is_m & ~next_m & (z != z_next)] = REVISED
    code[~is_m & next_m] = REMASKED
    return code


@dataclass(frozen=True)
class TransitionCounts:
    """Per step and sample counts (S, B) of each transition."""

    revealed: Tensor
    revised: Tensor
    remasked: Tensor


@dataclass(frozen=True)
class Trajectory:
    """Recorded states (S + 1, B, L): z before the first step, then after each of the S steps.

    `labels` names the S steps (e.g. "step 3/8  t=0.625"); `mask_id` is m (None for UDLM).
    """

    states: Tensor
    labels: list[str]
    mask_id: int | None

    def __post_init__(self) -> None:
        if self.states.dim() != 3 or len(self.labels) != self.states.shape[0] - 1:
            raise ValueError(
                f"states must be (S+1, B, L) with S labels; got {tuple(self.states.shape)} "
                f"and {len(self.labels)} labels"
            )

    def transitions(self) -> Tensor:
        """Codes (S, B, L) int8 of every step's change."""
        return classify(self.states[:-1], self.states[1:], self.mask_id)

    def counts(self) -> TransitionCounts:
        """How many positions each step revealed, revised and re-masked, (S, B) each."""
        codes = self.transitions()
        return TransitionCounts(*((codes == c).sum(-1) for c in (REVEALED, REVISED, REMASKED)))


@dataclass
class SampleOutput:
    """tokens (B, L), nfe (denoiser calls), trajectory (if recorded), wall_time in seconds."""

    tokens: Tensor
    nfe: int
    trajectory: Trajectory | None
    wall_time: float
