"""Few-step distillation targets for the mixed kernel (`xdlm distill`, `xdlm.train.distill`).

In the spirit of self-distillation through time (SDTT, Deschenaux & Gulcehre 2024), written for
any k: a student that samples with T steps learns, at each of its steps t -> s (on the grid
`UniformT` with T steps), the teacher's outcome of the same interval taken in two ancestral
half-steps t -> u -> s (the teacher's grid with 2T steps):

    z_t ~ q(· | x)                       forward kernel on a data row x (B, L)
    z_u ~ p_T(z_u | z_t)                 the teacher's exact half-step (`sample_posterior`)
    target(i) = p_T(· | z_u)_i           the teacher's x0 prediction after the half-step,
                                         except at k = 0 where a visible z_u_i is x0 exactly
                                         (MDLM carry-over): target(i) = one-hot(z_u_i)
    loss = Σ_i CE(target(i), p_S(· | z_t)_i)   over the positions the student's step reads:
                                         masked ones at k = 0, all at k > 0 (visible tokens
                                         may be revised or re-masked)

The student's x0 prediction at z_t thus absorbs what the teacher learns from the tokens its
first half-step revealed (and, at k > 0, revised). Its ancestral step t -> s with that
prediction imitates the teacher's two steps; rounds of halving (T -> T/2, the student of one
round teaching the next) reach few steps. The target is a distribution for every k: rows of p_T
(p_T(m) = 0) or one-hots of data ids, never a mask (tested).
Shapes: B batch, L length, V states (mask m included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from xdlm.core.categorical import denoiser_probs
from xdlm.core.kernel import MixedKernel
from xdlm.core.objective import LossOutput
from xdlm.core.schedules import Schedule
from xdlm.models.protocol import Denoiser
from xdlm.sampling.steps import UniformT, sample_posterior


@dataclass(frozen=True)
class StudentSteps:
    """The student's step t -> s and the teacher's midpoint u for each row: times (B,)."""

    t: Tensor
    u: Tensor
    s: Tensor


def student_steps(schedule: Schedule, steps: int, t: Tensor, t_end: float = 1e-5) -> StudentSteps:
    """Map training times t (B,) in (0, 1] to one of the student's T steps, stratified as t is:
    step i = ⌊(1 − t)·T⌋ of the T-step grid, with u the midpoint on the teacher's 2T grid."""
    grid = UniformT(t_end).times(schedule, 2 * steps).to(t.device)  # (2T + 1,) float64
    i = ((1.0 - t.double()) * steps).floor().long().clamp(0, steps - 1)
    return StudentSteps(grid[2 * i], grid[2 * i + 1], grid[2 * i + 2])


def two_step_target(
    teacher: Denoiser,
    kernel: MixedKernel,
    schedule: Schedule,
    z_t: Tensor,
    times: StudentSteps,
    generator: torch.Generator | None,
    attention_mask: Tensor | None = None,
    cond: Tensor | None = None,
) -> Tensor:
    """The distillation target (B, L, V) for z_t (B, L) (module docstring): the teacher's
    half-step z_u ~ p_T(z_u | z_t), then p_T(· | z_u), one-hot at k = 0's visible z_u."""
    with torch.no_grad():  # inference only (inside, so mutmut mutates the body)
        p_t = denoiser_probs(teacher(z_t, times.t.float(), attention_mask, cond), kernel.mask_id)
        a_t, a_u = schedule.alpha(times.t), schedule.alpha(times.u)
        z_u = sample_posterior(kernel, p_t, z_t, a_t, a_u, generator)
        target = denoiser_probs(teacher(z_u, times.u.float(), attention_mask, cond), kernel.mask_id)
        if kernel.k == 0.0:
            onehot = torch.nn.functional.one_hot(z_u, target.shape[-1]).to(target.dtype)
            target = torch.where((z_u != kernel.mask_id).unsqueeze(-1), onehot, target)
        return target


def distillation_loss(
    student: Denoiser,
    kernel: MixedKernel,
    schedule: Schedule,
    x0: Tensor,
    *,
    teacher: Denoiser,
    steps: int,
    t: Tensor,
    generator: torch.Generator | None,
    attention_mask: Tensor | None = None,
    cond: Tensor | None = None,
    weighting: object = None,
) -> LossOutput:
    """Σ over the counted positions of CE(two-step target, p_S(· | z_t)) for data x0 (B, L) at
    the student's steps picked by t (B,); a drop-in `loss_fn` of the train loop (`weighting`
    is accepted and unused: every counted token weighs 1)."""
    times = student_steps(schedule, steps, t)
    z_t = kernel.sample_marginal(x0, schedule.alpha(times.t), generator)
    target = two_step_target(teacher, kernel, schedule, z_t, times, generator, attention_mask,
                             cond)  # fmt: skip
    log_p = kernel.log_probs(student(z_t, times.t.float(), attention_mask, cond))
    ce = -torch.where(target > 0, target * log_p, 0.0).sum(-1)  # (B, L)
    counted = torch.ones_like(z_t, dtype=torch.bool) if kernel.k > 0 else z_t == kernel.mask_id
    if attention_mask is not None:
        counted = counted & attention_mask
    per_token = torch.where(counted, ce, 0.0)
    return LossOutput(per_token.sum(), counted.sum(), per_token, times.t, z_t)
