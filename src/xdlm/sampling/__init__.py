"""Samplers: pure step functions (`steps`, `confidence`), the loop (`loop.generate`), the
authors' LLaDA-XDLM algorithm with its own full-canvas loop (`xdm`), conditioning (prompt /
infilling / semi-AR / guidance) and trajectories with an HTML view."""

from xdlm.sampling.conditioning import (
    BLANK,
    block_windows,
    fixed_from_template,
    guided_logits,
    parse_infill,
)
from xdlm.sampling.confidence import Confidence, edit_budget
from xdlm.sampling.loop import SAMPLERS, generate, make_sampler
from xdlm.sampling.steps import (
    Ancestral,
    Fixed,
    LogitFilter,
    ReMDM,
    Sampler,
    StepOutput,
    StepTimes,
    final_step,
    time_grid,
)
from xdlm.sampling.trace_html import write_trace_html
from xdlm.sampling.trajectory import SampleOutput, Trajectory, TransitionCounts, classify
from xdlm.sampling.xdm import XDM, cumulative_edit_budget, transfer_counts

__all__ = [
    "BLANK",
    "SAMPLERS",
    "Ancestral",
    "Confidence",
    "Fixed",
    "LogitFilter",
    "ReMDM",
    "SampleOutput",
    "Sampler",
    "StepOutput",
    "StepTimes",
    "Trajectory",
    "TransitionCounts",
    "XDM",
    "block_windows",
    "classify",
    "cumulative_edit_budget",
    "edit_budget",
    "final_step",
    "fixed_from_template",
    "generate",
    "guided_logits",
    "make_sampler",
    "parse_infill",
    "time_grid",
    "transfer_counts",
    "write_trace_html",
]
