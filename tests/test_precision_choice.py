"""`train.precision` of a run (train/precision_choice.py): the training probe's step, the
precision a resumed run keeps from its checkpoint, explicit settings over kept ones (issue 29)."""

import types

import pytest
import torch

from xdlm import precision_probe as probe_mod
from xdlm.core.kernel import MixedKernel
from xdlm.precision import Precision
from xdlm.train.checkpoint import save_checkpoint
from xdlm.train.precision_choice import kept_precision, training_precision, training_probe


def _run(tmp_path, precision=None):
    meta = {
        "kernel": {"vocab_size": 3, "mask_id": 2, "k": 0.0},
        "schedule": {"name": "linear"},
        "config": {},
    }
    if precision is not None:
        meta["precision"] = precision
    run = tmp_path / "run"
    save_checkpoint(run, 6, model=torch.nn.Linear(2, 2), ema_state=None, train_state={},
                    meta=meta)  # fmt: skip
    return run


@pytest.mark.parametrize("mask_id", [2, None])
def test_the_training_probe_runs_a_step_without_the_mask_and_leaves_no_trace(mask_id):
    """Random x0 (B, L) with no mask token, the loss's backward run, gradients dropped, the
    global RNG (dropout) as it was."""
    kernel = MixedKernel(3, mask_id, 0.0 if mask_id is not None else 1.0)
    model, seen = torch.nn.Linear(64, 1), []

    def loss(model, x0, gen):
        seen.append(x0)
        assert isinstance(gen, torch.Generator)  # the probe's own seeded noise
        torch.rand(3)  # dropout draws from the global RNG
        return types.SimpleNamespace(nats=model(x0.float()).sum())

    probe = training_probe(model, kernel, loss, batch_size=4, seq_len=64)
    assert probe.shape.startswith("train step of Linear d=64 ") and probe.shape.endswith(
        ", B=4 L=64"
    )
    before = torch.get_rng_state()
    probe.run()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())
    (x0,) = seen
    assert x0.shape == (4, 64) and x0.dtype == torch.int64
    present = set(x0.unique().tolist())
    assert present == ({0, 1} if mask_id is not None else {0, 1, 2})


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_a_resumed_run_keeps_its_recorded_precision(tmp_path, name):
    run = _run(tmp_path, {"name": name, "reason": "measured"})
    assert kept_precision(run, resume=True) == Precision(
        name, "kept from the run's checkpoint step_0000006"
    )
    assert kept_precision(run, resume=False) is None


@pytest.mark.parametrize("precision", [None, {"name": "auto"}, {}])
def test_nothing_is_kept_from_an_older_or_odd_record(tmp_path, precision):
    assert kept_precision(_run(tmp_path, precision), resume=True) is None


def test_nothing_is_kept_without_a_checkpoint(tmp_path):
    assert kept_precision(tmp_path, resume=True) is None


def test_auto_keeps_the_run_and_explicit_settings_win(tmp_path, monkeypatch):
    def measure(step):
        raise AssertionError("measured")

    monkeypatch.setattr(probe_mod, "measure", measure)
    probe = probe_mod.StepProbe("shape", lambda: None)
    run = _run(tmp_path, {"name": "bf16", "reason": "measured"})
    kept = training_precision("auto", torch.device("cpu"), probe, run, resume=True)
    assert kept == Precision("bf16", "kept from the run's checkpoint step_0000006")
    explicit = training_precision("fp32", torch.device("cpu"), probe, run, resume=True)
    assert explicit == Precision("fp32", "set explicitly")
    with pytest.raises(ValueError, match="^unknown train.precision 'x'"):
        training_precision("x", torch.device("cpu"), probe, run, resume=True)
    (run / "checkpoints" / "step_0000006" / "meta.json").write_text("{")  # not even read
    assert training_precision("bf16", torch.device("cpu"), probe, run, resume=True).name == "bf16"
