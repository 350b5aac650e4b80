"""Command-level behaviour: one config schema for every command, who prints under torchrun."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import xdlm.commands.sample as sample_cmd
import xdlm.runs as runs
import xdlm.train.loop as loop
from xdlm.builders import FINAL_STEPS, GRIDS, REMDM_STRATEGIES, SAMPLERS, build_weighting
from xdlm.cli import build_parser, main
from xdlm.commands.options import command_config
from xdlm.config import SampleConfig, TrainConfig, XDLMConfig, choices, load_config
from xdlm.core.kernel import MixedKernel
from xdlm.core.objective import Weighting, corrupt_batch
from xdlm.core.schedules import LogLinear
from xdlm.train.loop import TrainResult


@pytest.mark.parametrize("rank,expected", [("0", 1), ("1", 0)])
def test_only_rank0_reports_and_samples_after_training(monkeypatch, capsys, rank, expected):
    """Regression: under torchrun every rank reloaded the checkpoint and printed samples."""
    monkeypatch.setenv("RANK", rank)
    result = TrainResult(Path("R"), 3, 1.5, None, False, 100.0)
    monkeypatch.setattr(loop, "train", lambda cfg, out, resume=False: result)
    calls = []
    monkeypatch.setattr(sample_cmd, "sample_from_run", lambda *a, **kw: calls.append(kw))
    assert main(["train", "--out", "R"]) == 0
    assert len(calls) == expected
    assert ("trained to step 3" in capsys.readouterr().out) == (expected == 1)


# ---------------------------------------------------------------------- one config schema


@pytest.fixture
def recorded_sample(monkeypatch):
    """`xdlm sample` with the run config of a default run and the sampler stubbed: the resolved
    `SampleConfig` each call would sample with."""
    seen = []
    monkeypatch.setattr(runs, "read_run_config", lambda path, trust=False: XDLMConfig())
    monkeypatch.setattr(sample_cmd, "sample_from_run", lambda run, s, **kw: seen.append(s))
    return seen


def test_sample_flags_set_and_config_file_are_one_schema(recorded_sample, tmp_path):
    """`--steps 8`, `--set sample.steps=8` and a YAML `sample:` section give the same settings;
    untouched keys keep the single defaults of `SampleConfig`."""
    (tmp_path / "s.yaml").write_text("sample:\n  steps: 8\n  top_p: 0.9\n")
    assert main(["sample", "--ckpt", "R", "--steps", "8", "--top-p", "0.9"]) == 0
    assert (
        main(["sample", "--ckpt", "R", "--set", "sample.steps=8", "--set", "sample.top_p=0.9"]) == 0
    )
    assert main(["sample", "--ckpt", "R", "--config", str(tmp_path / "s.yaml")]) == 0
    assert recorded_sample[0] == recorded_sample[1] == recorded_sample[2]
    assert recorded_sample[0] == dataclasses.replace(SampleConfig(), steps=8, top_p=0.9)
    assert main(["sample", "--ckpt", "R", "--steps", "4", "--set", "sample.steps=2"]) == 0
    assert recorded_sample[-1].steps == 2  # --set wins over the shorthand flag


def test_inference_commands_take_how_to_denoise_from_the_run_and_sizes_from_the_invocation(
    monkeypatch,
):
    """The run's sampler choice carries over; its steps and eval sizes do not (xdlm.invocation:
    how much to compute belongs to the command line or the schema's defaults)."""
    run_cfg = load_config(None, ["sample.steps=16", "sample.sampler=remdm", "eval.t_samples=2"])
    monkeypatch.setattr(runs, "read_run_config", lambda path, trust=False: run_cfg)
    args = build_parser().parse_args(["sample", "--ckpt", "R", "--num-samples", "1"])
    cfg = command_config(args)
    assert (cfg.sample.steps, cfg.sample.sampler, cfg.sample.num_samples) == (32, "remdm", 1)
    args = build_parser().parse_args(["eval", "--ckpt", "R", "--set", "eval.steps=[4, 8]"])
    assert command_config(args).eval.steps == [4, 8] and command_config(args).eval.t_samples == 4


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--set", "kernel.k=0"], "fixed by its checkpoint"),
        (["--set", "sample.stepz=3"], "unknown config key 'sample.stepz'.*'steps'"),
        (["--set", "sample.steps=many"], "'sample.steps' expects int"),
        (["--set", "sample.final=best"], "must be one of"),
    ],
)
def test_inference_config_errors_name_the_key(recorded_sample, capsys, argv, match):
    assert main(["sample", "--ckpt", "R", *argv]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_unknown_weighting_is_an_error_not_unit():
    """Regression: `weighting="ELBO"` silently meant unit weighting."""
    with pytest.raises(ValueError, match="must be one of \\['elbo', 'unit'\\]"):
        load_config(None, ["train.weighting=ELBO"])
    with pytest.raises(ValueError, match="weighting"):
        build_weighting(TrainConfig(weighting="ELBO"))
    with pytest.raises(ValueError, match="Weighting"):
        corrupt_batch(MixedKernel(5, 4, 0.1), LogLinear(), torch.zeros(1, 3, dtype=torch.long),
                      weighting="ELBO")  # fmt: skip
    assert build_weighting(TrainConfig(weighting="unit")) is Weighting.UNIT


def test_builders_cover_every_literal_choice():
    assert set(choices(SampleConfig, "sampler")) == set(SAMPLERS)
    assert set(choices(SampleConfig, "final")) == set(FINAL_STEPS)
    assert set(choices(SampleConfig, "grid")) == set(GRIDS)
    assert set(choices(SampleConfig, "remdm_strategy")) == set(REMDM_STRATEGIES)
    assert set(choices(TrainConfig, "weighting")) == {w.value for w in Weighting}
