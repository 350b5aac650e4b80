"""Reverse-step functions: pure maps (p_θ, z_t, times, generator) -> `StepOutput`.

In the style of diffusers schedulers, a sampler's `step` is a pure function of the denoiser
output p_θ (B, L, V) = `LogitFilter.probs(logits, m)` (softmax with p_θ(m) = 0, after
temperature / top-k / top-p), the current z_t (B, L), the times and a generator; the caller
(`xdlm.sampling.loop.generate`) writes the loop.
Shapes: B batch, L length, V states (mask m included). Every step ends with `Fixed.pin`, so a
fixed position (prompt, infilling context, earlier semi-AR block) never changes.

Samplers (frozen dataclasses with a `step` method):

- `Ancestral`: the exact XDLM posterior p_θ(z_s | z_t) for any k (`MixedKernel.posterior_probs`)
  with p_θ = softmax(filtered logits), drawn by `sample_posterior`: each position first picks
  a route (p_θ-part, uniform part, stay at z_t, re-mask) from the four per-position masses of
  `MixedKernel.posterior_coefficients`, and only positions on the p_θ route draw from p_θ
  (float64 inverse CDF on those rows only), so no (B, L, V) temporaries exist.
- `ReMDM` (k = 0 only): MDLM's posterior with remasking of a fraction σ_t of visible tokens.
- `Confidence` (in `xdlm.sampling.confidence`): LLaDA-style greedy unmasking + edit budget.
- `PredictorCorrector` (in `xdlm.sampling.corrector`): ancestral + forward–backward corrector.
- `Threshold` (in `xdlm.sampling.threshold`): confidence-threshold reveal / revise / re-mask.
- `Dilated` (in `xdlm.sampling.dilated`): the posterior with reveals planned in van der Corput
  order.

`AncestralFinal` / `GreedyFinal` are the noise-removal step α_s = 1; `UniformT` / `UniformAlpha`
/ `Doubling` build the step grid. Strings from the config pick these classes once, in
`xdlm.builders`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from xdlm.core.categorical import denoiser_probs, sample_categorical
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule


@dataclass(frozen=True)
class LogitFilter:
    """Temperature, top-k and top-p applied to the denoiser logits before the posterior."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def probs(self, logits: Tensor, mask_id: int | None) -> Tensor:
        """p_θ (B, L, V) with p_θ(m) = 0, float32+."""
        return denoiser_probs(logits, mask_id, self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True)
class Fixed:
    """Positions that no sampler may change: `mask` (B, L) bool, True = fixed to `tokens` (B, L)."""

    mask: Tensor
    tokens: Tensor

    def __post_init__(self) -> None:
        if self.mask.shape != self.tokens.shape or self.mask.dtype != torch.bool:
            raise ValueError(
                f"Fixed needs a bool mask and tokens of one shape (B, L); got "
                f"{self.mask.dtype} {tuple(self.mask.shape)} and {tuple(self.tokens.shape)}"
            )

    @classmethod
    def none(cls, z: Tensor) -> Fixed:
        """Nothing fixed, shaped like z (B, L)."""
        return cls(torch.zeros_like(z, dtype=torch.bool), z.clone())

    def pin(self, z: Tensor) -> Tensor:
        """z with every fixed position set to its fixed token (a new tensor)."""
        return torch.where(self.mask, self.tokens.to(z.device), z)


@dataclass(frozen=True)
class StepTimes:
    """One reverse step t -> s: α_t, α_s (B,) with α_s ≥ α_t; `steps_left` counts this step."""

    alpha_t: Tensor
    alpha_s: Tensor
    steps_left: int


@dataclass(frozen=True)
class StepOutput:
    """z_s (B, L) and the distribution it was drawn from, (B, L, V), or None if deterministic."""

    z_s: Tensor
    probs: Tensor | None


class Sampler(Protocol):
    """`step(kernel, p_x0 (B, L, V), z_t (B, L), times, generator, fixed) -> StepOutput`.

    `uses_final_step`: whether the loop applies `final_step` after the T steps;
    `prior(kernel, shape, generator, device)` draws the starting state z_1 (B, L).
    """

    uses_final_step: bool

    def prior(
        self,
        kernel: MixedKernel,
        shape: tuple[int, int],
        generator: torch.Generator | None,
        device: str | torch.device,
    ) -> Tensor: ...

    def step(
        self,
        kernel: MixedKernel,
        p_x0: Tensor,
        z_t: Tensor,
        times: StepTimes,
        generator: torch.Generator | None,
        fixed: Fixed,
    ) -> StepOutput: ...


def sample_posterior(
    kernel: MixedKernel,
    probs: Tensor,
    z_t: Tensor,
    alpha_t: Tensor,
    alpha_s: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One ancestral step z_s ~ p_θ(z_s | z_t) (B, L), exact, without (B, L, V) temporaries.

    With p_θ = probs (B, L, V) (p_θ(m) = 0, rows summing to 1; filters already applied) and the
    per-position masses of `kernel.posterior_coefficients`,

        p(e) = scale·p_θ(e) + shift + stay·[e = z_t] + remask·[e = m],

    a position takes route R ∈ {p_θ, uniform, stay, re-mask} with probability ∝ (scale,
    V·shift, stay, remask), then emits a draw from p_θ, a uniform id in [0, V), z_t, or m. Only
    the p_θ-route rows are read in full (float64 inverse CDF); at k = 0 visible positions always
    stay and are never read. α_t, α_s (B,) with α_s ≥ α_t; α_s = 1 is the final step.
    """
    kernel.check_posterior_args(probs, z_t, alpha_t, alpha_s)
    masses = route_masses(kernel, probs, z_t, alpha_t, alpha_s)
    return emit_routes(kernel, probs, z_t, draw_routes(masses, generator), generator)


def route_masses(
    kernel: MixedKernel, probs: Tensor, z_t: Tensor, alpha_t: Tensor, alpha_s: Tensor
) -> Tensor:
    """(B, L, 4) float64 masses of the routes (p_θ, uniform, stay, re-mask) of one posterior
    step: (scale, V·shift, stay, remask) of `MixedKernel.posterior_coefficients`."""
    p_z = probs.gather(-1, z_t.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    c = kernel.posterior_coefficients(p_z, z_t, alpha_t.double(), alpha_s.double())
    return torch.stack([c.scale, kernel.vocab_size * c.shift, c.stay, c.remask], -1)


def draw_routes(masses: Tensor, generator: torch.Generator | None) -> Tensor:
    """Route per position (B, L) long, 0 p_θ, 1 uniform, 2 stay, 3 re-mask, ∝ masses (B, L, 4)."""
    cum = masses.cumsum(-1)
    u = torch.rand(masses.shape[:-1], generator=generator, dtype=torch.float64,
                   device=masses.device)  # fmt: skip
    return (u.unsqueeze(-1) * cum[..., -1:] >= cum).sum(-1)


def emit_routes(
    kernel: MixedKernel, probs: Tensor, z_t: Tensor, route: Tensor,
    generator: torch.Generator | None,
) -> Tensor:  # fmt: skip
    """z_s (B, L): a draw from p_θ (route 0, float64 inverse CDF on those rows only), a uniform
    id in [0, V) (1), z_t (2) or m (3)."""
    uniform = torch.randint(kernel.vocab_size, z_t.shape, generator=generator, device=z_t.device)
    z_s = torch.where(route == 1, uniform, z_t)
    if kernel.mask_id is not None:
        z_s = z_s.masked_fill(route == 3, kernel.mask_id)
    rows = (route == 0).nonzero(as_tuple=True)
    if rows[0].numel():
        z_s[rows] = sample_categorical(probs[rows], generator)
    return z_s


@dataclass(frozen=True)
class Ancestral:
    """z_s ~ p_θ(z_s | z_t) ∝ Q_{t|s}(z_t | z_s)·f_{α_s}(p_θ, z_s): reveal, revise and re-mask.

    The closed form is `MixedKernel.posterior_probs`; the draw is the lean exact sampler
    `sample_posterior` (route per position, float64 inverse CDF only on the rows that draw
    from p_θ, no (B, L, V) temporaries), so no zero-probability state is ever drawn.
    """

    uses_final_step: bool = True

    def prior(
        self,
        kernel: MixedKernel,
        shape: tuple[int, int],
        generator: torch.Generator | None,
        device: str | torch.device,
    ) -> Tensor:
        """z_1 ~ r: the mask with probability 1 − k, else uniform over all V ids."""
        return kernel.sample_prior(shape, generator, device)

    def step(
        self,
        kernel: MixedKernel,
        p_x0: Tensor,
        z_t: Tensor,
        times: StepTimes,
        generator: torch.Generator | None,
        fixed: Fixed,
    ) -> StepOutput:
        z_s = sample_posterior(kernel, p_x0, z_t, times.alpha_t, times.alpha_s, generator)
        return StepOutput(fixed.pin(z_s), None)


@dataclass(frozen=True)
class ReMDM:
    """ReMDM remasking for k = 0 (Wang et al. 2025), per position:

        z_t = m:        z_s = x ~ p_θ with prob (α_s − (1 − σ_t)·α_t)/(1 − α_t), else m
        z_t = j ≠ m:    z_s = j with prob 1 − σ_t, else m (re-masked)

    with σ_t ≤ σ_max = min(1, (1 − α_s)/α_t) so all probabilities stay in [0, 1].
    ReMDM's "cap" strategy (the default): σ_t = min(η, σ_max); `rescale=True` (its "rescale"
    strategy, `sample.remdm_strategy=rescale`): σ_t = η·σ_max. σ_t = 0 is exactly MDLM's
    ancestral step.
    """

    eta: float = 0.01
    rescale: bool = False
    uses_final_step: bool = True
    prior = Ancestral.prior  # z_1 ~ r (all [MASK] at k = 0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"ReMDM eta must be in [0, 1], got {self.eta}")

    def sigma(self, alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
        """σ_t (B,) for the step α_t -> α_s."""
        sigma_max = ((1.0 - alpha_s) / alpha_t).clamp(max=1.0)
        return self.eta * sigma_max if self.rescale else sigma_max.clamp(max=self.eta)

    def step(
        self,
        kernel: MixedKernel,
        p_x0: Tensor,
        z_t: Tensor,
        times: StepTimes,
        generator: torch.Generator | None,
        fixed: Fixed,
    ) -> StepOutput:
        if kernel.k != 0.0 or kernel.mask_id is None:
            raise ValueError(f"ReMDM remasking needs a pure-mask kernel (k=0), got k={kernel.k}")
        at, as_ = (a.to(p_x0).unsqueeze(-1) for a in (times.alpha_t, times.alpha_s))  # (B, 1)
        sigma = self.sigma(at, as_)
        masked = z_t == kernel.mask_id
        reveal = (as_ - (1.0 - sigma) * at) / (1.0 - at)
        probs = p_x0 * torch.where(masked, reveal, 0.0).unsqueeze(-1)  # the one (B, L, V) array
        keep = torch.where(masked, 0.0, 1.0 - sigma)
        to_mask = torch.where(masked, (1.0 - as_ - sigma * at) / (1.0 - at), sigma)
        probs.scatter_add_(-1, z_t.unsqueeze(-1), keep.unsqueeze(-1))
        probs[..., kernel.mask_id] += to_mask
        return StepOutput(fixed.pin(sample_categorical(probs, generator)), probs)


class FinalStep(Protocol):
    """Noise removal t -> 0 (α_s = 1): `step(kernel, p_x0 (B, L, V), z_t (B, L), α_t (B,),
    generator, fixed) -> StepOutput`. `generate(final=None)` skips it (masks may remain)."""

    def step(
        self,
        kernel: MixedKernel,
        p_x0: Tensor,
        z_t: Tensor,
        alpha_t: Tensor,
        generator: torch.Generator | None,
        fixed: Fixed,
    ) -> StepOutput: ...


@dataclass(frozen=True)
class AncestralFinal:
    """Draw z_0 from the α_s = 1 posterior p_θ(z_0 | z_t): no mask survives."""

    def step(self, kernel, p_x0, z_t, alpha_t, generator, fixed) -> StepOutput:
        times = StepTimes(alpha_t, torch.ones_like(alpha_t), 1)
        return Ancestral().step(kernel, p_x0, z_t, times, generator, fixed)


@dataclass(frozen=True)
class GreedyFinal:
    """The argmax of the α_s = 1 posterior, as in the paper's code: at a masked position that
    is argmax p_θ; at a visible position j it is argmax_e k·β_t·p_θ(e)/F + [e = j]·(1 − k·β_t/F)
    with F = V·α_t·p_θ(j) + k·β_t, i.e. j is replaced only when the model strongly prefers
    another token (never for k = 0)."""

    def step(self, kernel, p_x0, z_t, alpha_t, generator, fixed) -> StepOutput:
        probs = kernel.posterior_probs(p_x0, z_t, alpha_t, torch.ones_like(alpha_t))
        return StepOutput(fixed.pin(probs.argmax(-1)), probs)


class TimeGrid(Protocol):
    """`times(schedule, steps)`: the T + 1 decreasing times t_0 = 1 > ... > t_T (float64)."""

    def times(self, schedule: Schedule, steps: int) -> Tensor: ...


def _check_grid(steps: int, t_end: float) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"t_end must be in [0, 1), got {t_end}")


def _linspace(start: float, end: float, steps: int, t_end: float) -> Tensor:
    _check_grid(steps, t_end)
    return torch.linspace(start, end, steps + 1, dtype=torch.float64)


@dataclass(frozen=True)
class UniformT:
    """The paper's grid: t_i = linspace(1, t_end, T + 1)."""

    t_end: float = 1e-5

    def times(self, schedule: Schedule, steps: int) -> Tensor:
        return _linspace(1.0, self.t_end, steps, self.t_end)


@dataclass(frozen=True)
class UniformAlpha:
    """Uniform in α_t between α_1 and α_{t_end}, mapped back with `schedule.t_of_alpha`."""

    t_end: float = 1e-5

    def times(self, schedule: Schedule, steps: int) -> Tensor:
        ends = schedule.alpha(torch.tensor([1.0, self.t_end], dtype=torch.float64))
        alphas = _linspace(float(ends[0]), float(ends[1]), steps, self.t_end)
        return schedule.t_of_alpha(alphas)


@dataclass(frozen=True)
class Doubling:
    """α doubles every step: α_{t_j} = 2^{j−T} for j = 1..T (α_{t_T} = α_{t_end}), α_{t_0} = α_1,
    mapped back with `schedule.t_of_alpha`. Each step reveals about as many tokens as all
    earlier steps together (the first ≈ L/2^{T−1}): few first, when they are drawn without
    context; with `Dilated` this is the dyadic refinement of the sequence. For T > log2 L + 1
    the first steps reveal nothing."""

    t_end: float = 1e-5

    def times(self, schedule: Schedule, steps: int) -> Tensor:
        _check_grid(steps, self.t_end)
        ends = schedule.alpha(torch.tensor([1.0, self.t_end], dtype=torch.float64))
        alphas = torch.pow(2.0, torch.arange(1 - steps, 1, dtype=torch.float64))  # 2^{j−T}
        alphas = torch.cat([ends[:1], alphas[:-1], ends[1:]]).clamp(float(ends[0]), float(ends[1]))
        return schedule.t_of_alpha(alphas)
