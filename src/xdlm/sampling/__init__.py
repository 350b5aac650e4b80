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
from xdlm.sampling.corrector import PredictorCorrector
from xdlm.sampling.dilated import Dilated, van_der_corput_rank
from xdlm.sampling.loop import generate
from xdlm.sampling.steps import (
    Ancestral,
    AncestralFinal,
    Doubling,
    FinalStep,
    Fixed,
    GreedyFinal,
    LogitFilter,
    ReMDM,
    Sampler,
    StepOutput,
    StepTimes,
    TimeGrid,
    UniformAlpha,
    UniformT,
    sample_posterior,
)
from xdlm.sampling.threshold import Threshold
from xdlm.sampling.trace_html import write_trace_html
from xdlm.sampling.trajectory import SampleOutput, Trajectory, TransitionCounts, classify
from xdlm.sampling.xdm import XDM, cumulative_edit_budget, transfer_counts

__all__ = [
    "BLANK",
    "Ancestral",
    "AncestralFinal",
    "Confidence",
    "Dilated",
    "Doubling",
    "FinalStep",
    "Fixed",
    "GreedyFinal",
    "LogitFilter",
    "PredictorCorrector",
    "ReMDM",
    "SampleOutput",
    "Sampler",
    "StepOutput",
    "StepTimes",
    "Threshold",
    "TimeGrid",
    "Trajectory",
    "TransitionCounts",
    "UniformAlpha",
    "UniformT",
    "XDM",
    "block_windows",
    "classify",
    "cumulative_edit_budget",
    "edit_budget",
    "fixed_from_template",
    "generate",
    "guided_logits",
    "parse_infill",
    "sample_posterior",
    "transfer_counts",
    "van_der_corput_rank",
    "write_trace_html",
]
