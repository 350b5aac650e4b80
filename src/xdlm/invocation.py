"""What `xdlm sample | eval | images` take from a run, and what from the invocation.

A run (or an export) may have been written by someone else. Its model, kernel and data describe
the checkpoint and are used as saved; its `sample` section may recommend how to denoise
(`RUN_SAMPLING_KEYS`). Everything else of the inference sections -- how much to compute, on
what device, what to read, write or score with -- comes from the command line or the schema's
defaults (`invocation_defaults`), so a run's files cannot make a plain `xdlm eval --ckpt RUN`
write a file of the user's or make `xdlm sample` run for hours (docs/security.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xdlm.config import (
    EvalConfig,
    ImagesConfig,
    SampleConfig,
    XDLMConfig,
    apply_file,
    apply_overrides,
    check_section,
    merge,
    validate,
)

INFERENCE_SECTIONS = ("sample", "eval", "images")
# What a run's saved `sample` section may carry into `xdlm sample | eval | images`: how to
# denoise. Every other setting of the inference sections belongs to the invocation: how much to
# compute (steps, samples, lengths, batch sizes, evaluation sizes), where (device, precision),
# what to read, write or score with (data, corpora, scorer, plot), what to condition on (prompt,
# infill, class label, guidance) and the seed.
RUN_SAMPLING_KEYS = (
    "sampler", "final", "grid", "t_end", "temperature", "top_k", "top_p", "remdm_eta",
    "remdm_strategy", "xdm_remasking", "xdm_protect_prompt", "xdm_rank_dtype", "pc_eta",
    "threshold", "threshold_revise", "threshold_remask", "dilated_uniform_reveal", "use_ema",
)  # fmt: skip


def invocation_defaults(run_config: XDLMConfig) -> XDLMConfig:
    """`run_config` (a run's saved config) with every invocation-owned setting back at the
    schema's default: `sample` keeps only `RUN_SAMPLING_KEYS`, `eval` and `images` are reset."""
    kept = {key: getattr(run_config.sample, key) for key in RUN_SAMPLING_KEYS}
    return dataclasses.replace(
        run_config, sample=SampleConfig(**kept), eval=EvalConfig(), images=ImagesConfig()
    )


def inference_config(
    run_config: XDLMConfig,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict | None = None,
) -> XDLMConfig:
    """The config of `xdlm sample | eval | images`: the run's saved config with its
    invocation-owned settings at their defaults (`invocation_defaults`), then the YAML file,
    then the command's shorthand flags (a nested dict, e.g. {"sample": {"steps": 8}}), then
    `--set`. Only `INFERENCE_SECTIONS` may change: model, kernel and data are the checkpoint's."""
    cfg = apply_file(invocation_defaults(run_config), path, INFERENCE_SECTIONS)
    for section in flags or {}:
        check_section(section, INFERENCE_SECTIONS, "flag for section")
    cfg = merge(cfg, flags or {})
    return validate(apply_overrides(cfg, overrides, INFERENCE_SECTIONS))
