"""Predictor–corrector sampling for the mixed kernel (`sample.sampler = pc`).

Predictor: the exact ancestral step z_s ~ p_θ(z_s | z_t) (`Ancestral`). Corrector, right after
it and at the same level s: a forward–backward move

    1. re-noise z_s with the forward kernel to the level c between s and t,
           z_c ~ Q_{c|s}(· | z_s),   α_c = α_s − η·(α_s − α_t)   (β_{c|s} = η·β_{t|s}),
       i.e. each position independently keeps its state with probability α_{c|s} = α_c/α_s and
       is otherwise replaced by a draw from the prior r (the mask with share 1 − k, a uniform
       id with share k): a fraction ≈ η·β_{t|s} of the positions is re-noised;
    2. denoise it back: z_s' ~ p_θ(z_s | z_c) (one more denoiser call, at α_c).

Stationarity (docs/sampling.md, "Predictor–corrector"): let p_θ be an oracle, i.e. one whose
kernel posterior p_θ(z_s | z_c) is the true reverse q(z_s | z_c) (per position that is
p̃(x) ∝ q(x | z_c)/f_{α_c}(x, z_c): the true posterior q(x | z_c) at a masked position and at
k = 0; at a visible position with k > 0 the kernel divides by f_{α_c}(p_θ, z_c) itself). If
z_s ~ q_s, step 1 gives (z_s, z_c) ~ q(z_s, z_c), and step 2 draws from q(z_s | z_c), so
z_s' ~ q_s again: the corrector leaves the marginal q_s invariant for every k and η.
With a learned factorised p_θ it
re-draws the re-noised positions given the rest of the sequence (a Gibbs-like refinement of
the factorisation error of the predictor), at the cost of one denoiser call per step
(NFE ≈ 2T + 1). At k = 0 this is a ReMDM-style remasking of visible tokens; at k > 0 the
re-noised positions may also be uniform ids, which the posterior then revises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from xdlm.core.kernel import MixedKernel
from xdlm.sampling.steps import Ancestral, Fixed, StepTimes

# p_θ (B, L, V) of the (filtered) denoiser at state z (B, L) and level α (B,).
Denoise = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PredictorCorrector:
    """Ancestral predictor + one forward–backward corrector move per step (module docstring).

    `eta` ∈ (0, 1]: the corrector's re-noising level as a share of the step, α_c = α_s −
    η·(α_s − α_t); η = 1 re-noises back to α_t. The loop (`generate`) calls `correct` after
    every `step` with a `denoise(z, α)` that counts NFE like any other call.
    """

    eta: float = 0.5
    uses_final_step: bool = True
    prior = Ancestral.prior  # z_1 ~ r
    step = Ancestral.step  # the predictor: the exact ancestral step t -> s

    def __post_init__(self) -> None:
        if not 0.0 < self.eta <= 1.0:
            raise ValueError(f"predictor-corrector eta must be in (0, 1], got {self.eta}")

    def corrector_alpha(self, times: StepTimes) -> Tensor:
        """α_c = α_s − η·(α_s − α_t), (B,)."""
        return times.alpha_s - self.eta * (times.alpha_s - times.alpha_t)

    def correct(
        self,
        kernel: MixedKernel,
        denoise: Denoise,
        z_s: Tensor,
        times: StepTimes,
        generator: torch.Generator | None,
        fixed: Fixed,
    ) -> Tensor:
        """z_s (B, L) -> z_s' (B, L): re-noise to α_c with Q_{c|s}, then p_θ(z_s | z_c)."""
        alpha_c = self.corrector_alpha(times)
        z_c = fixed.pin(kernel.sample_marginal(z_s, alpha_c / times.alpha_s, generator))
        back = StepTimes(alpha_c, times.alpha_s, times.steps_left)
        return self.step(kernel, denoise(z_c, alpha_c), z_c, back, generator, fixed).z_s
