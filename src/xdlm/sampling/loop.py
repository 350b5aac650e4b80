"""The visible sampling loop: prior draw, T reverse steps, optional noise removal.

    from xdlm.sampling import generate
    out = generate(model, kernel, schedule, batch_size=4, seq_len=128, steps=32,
                   generator=torch.Generator().manual_seed(0))
    out.tokens  # (B, L)      out.nfe  # denoiser calls      out.trajectory  # if record=True

One loop over the semi-AR windows (a single window unless `block_size` is set), and inside it
one loop over the T steps of the grid t_0 = 1 > t_1 > ... > t_T = t_end; then, for samplers
that use it, the final step t_T -> 0 with α = 1.

NFE counts denoiser forward calls honestly: a guided step costs 2, a cache hit costs 0. Caching
(MDLM's trick): when z_t is identical to the input of the previous call, the previous logits are
reused. This is exact when the denoiser ignores t (the paper's DiT has no time conditioning);
pass `cache=False` for time-conditioned backbones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule
from xdlm.models.protocol import Denoiser
from xdlm.sampling.conditioning import Window, block_windows, guided_logits
from xdlm.sampling.steps import (
    Ancestral,
    AncestralFinal,
    FinalStep,
    Fixed,
    LogitFilter,
    Sampler,
    StepTimes,
    TimeGrid,
    UniformT,
)
from xdlm.sampling.trajectory import SampleOutput, Trajectory
from xdlm.sampling.xdm import XDM

NO_FILTER = LogitFilter()
ANCESTRAL, ANCESTRAL_FINAL, PAPER_GRID = Ancestral(), AncestralFinal(), UniformT()  # defaults


@dataclass
class _Evaluator:
    """Calls the (guided) denoiser, reusing the last logits when z_t is unchanged."""

    denoiser: Denoiser
    labels: Tensor | None
    guidance: float
    cache: bool
    nfe: int = 0
    _last: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def __call__(self, z_t: Tensor, t: Tensor) -> Tensor:
        if self.cache and self._last is not None and _same(self._last[0], z_t):
            return self._last[1]
        logits = guided_logits(self.denoiser, z_t, t, self.labels, self.guidance)
        self.nfe += 1 if self.guidance == 0.0 else 2
        self._last = (z_t, logits)
        return logits


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def generate(
    denoiser: Denoiser,
    kernel: MixedKernel,
    schedule: Schedule,
    *,
    batch_size: int,
    seq_len: int,
    steps: int,
    generator: torch.Generator | None,
    sampler: Sampler | XDM = ANCESTRAL,
    filter: LogitFilter = NO_FILTER,
    final: FinalStep | None = ANCESTRAL_FINAL,
    grid: TimeGrid = PAPER_GRID,
    fixed: Fixed | None = None,
    block_size: int | None = None,
    context_len: int | None = None,
    class_labels: Tensor | None = None,
    guidance: float = 0.0,
    cache: bool = True,
    record: bool = False,
    device: str | torch.device = "cpu",
) -> SampleOutput:
    """Sample B sequences of length L with T steps per window.

    Args:
        sampler: a `Sampler` (`Ancestral`, `ReMDM`, `Confidence`, `PredictorCorrector`,
            `Threshold`) or an `XDM`; a sampler with a `correct` method (`PredictorCorrector`)
            gets one corrector move after every step, its denoiser calls counted in NFE;
            `xdlm.builders.build_sampler` makes one from the config's `sample.sampler`. `XDM`
            runs its own loop (`XDM.run`: full canvas, `steps` in total split over the blocks);
            it takes no filter or guidance (its temperature and cfg_scale are its own fields)
            and ignores final, grid, context_len, cache.
        filter: temperature / top-k / top-p turning logits into p_θ before every step.
        final: noise removal after the last step (`AncestralFinal`, `GreedyFinal`), or None;
            ignored by samplers with `uses_final_step = False`.
        grid: the step times (`UniformT(t_end)`, the paper's, or `UniformAlpha(t_end)`).
        fixed: positions never changed (prompt, infilling); `Fixed` (B, L).
        block_size, context_len: semi-AR generation in blocks, each seen with at most
            `context_len` columns (the training length) of left context.
        class_labels: (B,) class ids for class-conditional models; `guidance` is the CFG scale w.
        record: keep every state in `SampleOutput.trajectory`.
    """
    with torch.no_grad():  # inference only (inside, so mutmut mutates the body)
        start = time.perf_counter()
        if isinstance(sampler, XDM):
            if filter != NO_FILTER or guidance != 0.0:
                raise ValueError(
                    "the xdm sampler takes no LogitFilter or guidance; set XDM(temperature=..., "
                    f"cfg_scale=...) instead (got {filter}, guidance={guidance})"
                )
            return sampler.run(
                denoiser, kernel, batch_size=batch_size, seq_len=seq_len, steps=steps,
                generator=generator, fixed=fixed, block_size=block_size, class_labels=class_labels,
                record=record, device=device,
            )  # fmt: skip
        evaluate = _Evaluator(denoiser, class_labels, guidance, cache)
        z = sampler.prior(kernel, (batch_size, seq_len), generator, device)
        fixed = fixed if fixed is not None else Fixed.none(z)
        z = fixed.pin(z)
        recorder = _Recorder(record, [z])
        ts = grid.times(schedule, steps).to(device)
        correct = getattr(sampler, "correct", None)  # a corrector move after every step (pc)

        def denoise(z_c: Tensor, alpha_c: Tensor) -> Tensor:
            return filter.probs(evaluate(z_c, schedule.t_of_alpha(alpha_c)), kernel.mask_id)

        for b, window in enumerate(block_windows(seq_len, block_size, context_len)):
            win_fixed = _window_fixed(fixed, z, window)
            if bool(win_fixed.mask.all()):
                continue  # e.g. a block covered by the prompt
            for i in range(steps + int(sampler.uses_final_step and final is not None)):
                t = ts[min(i, steps)].expand(batch_size)
                z_w = z[:, window.start : window.end]
                p_x0 = filter.probs(evaluate(z_w, t), kernel.mask_id)
                if i < steps:
                    s_next = ts[i + 1].expand(batch_size)
                    times = StepTimes(schedule.alpha(t), schedule.alpha(s_next), steps - i)
                    z_w = sampler.step(kernel, p_x0, z_w, times, generator, win_fixed).z_s
                    if correct is not None:
                        z_w = correct(kernel, denoise, z_w, times, generator, win_fixed)
                else:
                    alpha_t = schedule.alpha(t)
                    z_w = final.step(kernel, p_x0, z_w, alpha_t, generator, win_fixed).z_s
                z = torch.cat([z[:, : window.start], z_w, z[:, window.end :]], dim=1)
                recorder.add(z, f"block {b} " + (f"step {i + 1}" if i < steps else "final"), t)
        trajectory = recorder.trajectory(kernel.mask_id)
        return SampleOutput(z, evaluate.nfe, trajectory, time.perf_counter() - start)


@dataclass
class _Recorder:
    """Collects the states (B, L) and step labels when `on`."""

    on: bool
    states: list[Tensor]
    labels: list[str] = field(default_factory=list)

    def add(self, z: Tensor, name: str, t: Tensor) -> None:
        if self.on:
            self.states.append(z)
            self.labels.append(f"{name}  t={float(t[0]):.4g}")

    def trajectory(self, mask_id: int | None) -> Trajectory | None:
        return Trajectory(torch.stack(self.states), self.labels, mask_id) if self.on else None


def _window_fixed(fixed: Fixed, z: Tensor, window: Window) -> Fixed:
    """The window's fixed positions: the user's, plus every column left of the block."""
    cols = torch.arange(window.start, window.end, device=z.device)
    earlier = (cols < window.begin).expand(z.shape[0], -1)
    mask = fixed.mask[:, window.start : window.end] | earlier
    return Fixed(mask, z[:, window.start : window.end])
