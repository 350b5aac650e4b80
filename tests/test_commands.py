"""Command-level behaviour shared by every command: who prints under torchrun."""

from __future__ import annotations

from pathlib import Path

import pytest

import xdlm.commands.sample as sample_cmd
import xdlm.train.loop as loop
from xdlm.cli import main
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
