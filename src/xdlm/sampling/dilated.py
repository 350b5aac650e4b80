"""Planned (dilated) reveal for the mixed kernel (`sample.sampler = dilated`).

Few steps lose quality because the tokens revealed in one step are drawn independently given
z_t. The ancestral step (`Ancestral`) lets every masked position leave the mask independently
with the same probability

    P(z_s ≠ m | z_t = m) = 1 − stay = 1 − (β_s/β_t)·(1 − k·β_{t|s})

(`MixedKernel.posterior_coefficients`), so a step's revealed set is a random subset, and a
leaving position takes the uniform route (a random token) with probability ∝ V·shift. This
sampler changes two things and keeps the rest of the exact posterior:

1. *Which* masked positions leave: each step the n = ⌊M·(1 − stay) + ½⌋ free masked positions
   (M in the row; n is the ancestral step's expected count) that come first in the
   van der Corput order leave, the others stay masked. The order lists positions by their
   index with its bits reversed (0, L/2, L/4, 3L/4, L/8, …), so every prefix is spread evenly
   over the sequence: tokens revealed together are far apart, and later ones land between
   tokens already revealed (the dilated schedule of Luxembourg et al. 2025, "Plan for speed",
   here for the mixed kernel). With the `doubling` grid each step fills the midpoints of the
   last (dyadic refinement).
2. *How* they leave: from p_θ only (`uniform_reveal=False`, the default). The posterior's
   uniform route plants a random token that later steps must find and revise; with few steps
   they cannot, and it costs quality (measured in docs/results.md, "Few-step frontier").
   `uniform_reveal=True` keeps the posterior's routes, ∝ (scale, V·shift).

Visible positions (the prior's uniform tokens, earlier reveals) follow the exact posterior
(revise, re-mask) as in `Ancestral`. At k = 0 with one reveal per step and an oracle denoiser the
samples follow the data's law exactly (any-order autoregression in the van der Corput order);
at k = 1 (no mask state) this is `Ancestral`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xdlm.core.kernel import MixedKernel
from xdlm.sampling.confidence import top_n
from xdlm.sampling.steps import (
    Ancestral,
    Fixed,
    StepOutput,
    StepTimes,
    draw_routes,
    emit_routes,
    route_masses,
)

P_THETA, UNIFORM, STAY = 0, 1, 2  # routes of `draw_routes`


def van_der_corput_rank(length: int, device: str | torch.device = "cpu") -> Tensor:
    """(L,) long: position i's place in the bit-reversal order of 0..L−1 (0 is first)."""
    bits = max(1, (length - 1).bit_length())  # enough for the largest index, exactly
    i = torch.arange(length, device=device)
    reversed_bits = torch.zeros_like(i)
    for b in range(bits):
        reversed_bits |= ((i >> b) & 1) << (bits - 1 - b)
    return reversed_bits.argsort().argsort()


@dataclass(frozen=True)
class Dilated(Ancestral):
    """The ancestral posterior with the masked positions that leave the mask planned in the
    van der Corput order, revealed from p_θ (module docstring); prior and final step are
    `Ancestral`'s."""

    uniform_reveal: bool = False

    def step(
        self,
        kernel: MixedKernel,
        p_x0: Tensor,
        z_t: Tensor,
        times: StepTimes,
        generator: torch.Generator | None,
        fixed: Fixed,
    ) -> StepOutput:
        kernel.check_posterior_args(p_x0, z_t, times.alpha_t, times.alpha_s)
        masses = route_masses(kernel, p_x0, z_t, times.alpha_t, times.alpha_s)  # (B, L, 4)
        if kernel.mask_id is not None:
            masses = self._plan(masses, (z_t == kernel.mask_id) & ~fixed.mask.to(z_t.device))
        z_s = emit_routes(kernel, p_x0, z_t, draw_routes(masses, generator), generator)
        return StepOutput(fixed.pin(z_s), None)

    def _plan(self, masses: Tensor, masked: Tensor) -> Tensor:
        """masses (B, L, 4) with each free masked position's route decided by the plan: the
        first n (B,) in van der Corput order leave (no stay; p_θ only unless uniform_reveal),
        the other masked positions stay."""
        leave = masses[..., P_THETA] + masses[..., UNIFORM]  # 1 − stay at masked positions
        n = torch.floor((leave * masked).sum(-1) + 0.5).long()
        rank = van_der_corput_rank(masked.shape[-1], masked.device).to(torch.float64)
        planned = top_n(torch.where(masked, -rank, -math.inf), n)
        out = masses.clone()
        out[..., STAY] = torch.where(planned, 0.0, out[..., STAY])
        if not self.uniform_reveal:
            out[..., UNIFORM] = torch.where(planned, 0.0, out[..., UNIFORM])
        out[..., :STAY] = torch.where((masked & ~planned).unsqueeze(-1), 0.0, out[..., :STAY])
        return out
