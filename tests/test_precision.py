"""Precision: `auto` decides from the measured step once per machine and records it; explicit
choices are obeyed everywhere."""

import json

import pytest
import torch

from xdlm import precision as P
from xdlm import precision_probe as probe_mod
from xdlm.models.dit import DiT, DiTConfig


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """A private cache directory and `measure` replaced by fixed per-round ratios; returns the
    list of steps it was asked to time."""
    monkeypatch.setenv("XDLM_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def set_ratios(ratios):
        def fake(step):
            calls.append(step)
            return list(ratios)

        monkeypatch.setattr(probe_mod, "measure", fake)
        return calls

    return set_ratios


def _probe(shape="train step of Toy, B=2 L=4"):
    return probe_mod.StepProbe(shape, lambda: None)


@pytest.mark.parametrize(
    "ratios, expected",
    [
        ([1.2] * 5, ("bf16", 1.2)),  # exactly at the margin
        ([1.19] * 5, ("fp32", 1.19)),  # just below
        ([0.1, 1.3, 1.3, 9.0, 1.3], ("bf16", 1.3)),  # outliers of a loaded machine do not count
        ([5.0, 1.1, 0.2, 1.1, 1.1], ("fp32", 1.1)),
    ],
)
def test_decision_is_the_median_against_the_margin(ratios, expected):
    assert probe_mod.BF16_MARGIN == 1.2
    assert probe_mod.decide(ratios) == expected
    assert probe_mod.decide(list(reversed(ratios))) == expected


def test_decision_needs_measurements():
    with pytest.raises(ValueError, match="no measured rounds"):
        probe_mod.decide([])


def test_auto_measures_once_then_every_process_reads_the_record(measured, tmp_path):
    calls = measured([1.6, 1.5, 1.7, 1.4, 1.6])
    first = P.resolve_precision("auto", "cpu", _probe())
    assert first.name == "bf16" and len(calls) == 1
    assert "at 1.60x fp32's speed (median of 5 rounds), at least the 1.2x bf16 needs" in (
        first.reason
    )
    assert "measured now, recorded in" in first.reason
    measured([0.5] * 5)  # a slower measurement now would not change the recorded choice
    again = P.resolve_precision("auto", "cpu", _probe())
    assert again.name == "bf16" and len(calls) == 1
    assert again.reason.startswith("cached from ") and "at 1.60x fp32's speed" in again.reason
    record = json.loads((tmp_path / "cache" / "precision.json").read_text())
    (entry,) = record.values()
    assert entry["name"] == "bf16" and entry["speedup"] == 1.6 and entry["rounds"] == 5


def test_another_model_shape_is_measured_on_its_own(measured):
    calls = measured([0.9] * 5)
    assert P.resolve_precision("auto", "cpu", _probe("B=2 L=4")).name == "fp32"
    other = P.resolve_precision("auto", "cpu", _probe("B=2 L=8"))
    assert "below the 1.2x bf16 needs" in other.reason
    assert len(calls) == 2
    assert set(probe_mod.recorded_choices()) == {"B=2 L=4", "B=2 L=8"}


def test_a_damaged_record_is_measured_again(measured, tmp_path):
    calls = measured([2.0] * 5)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "precision.json").write_text("{not json")
    assert P.resolve_precision("auto", "cpu", _probe()).name == "bf16" and len(calls) == 1
    assert P.resolve_precision("auto", "cpu", _probe()).reason.startswith("cached from")


def test_an_unwritable_cache_still_decides(measured, tmp_path):
    (tmp_path / "cache").write_text("a file where the directory should be")
    calls = measured([0.5] * 5)
    chosen = P.resolve_precision("auto", "cpu", _probe())
    assert chosen.name == "fp32" and "not recorded: cache not writable" in chosen.reason
    assert len(calls) == 1


def test_explicit_and_kept_choices_are_obeyed_without_measuring(measured):
    calls = measured([2.0] * 5)
    assert P.resolve_precision("bf16", "cpu", _probe()).name == "bf16"
    assert P.resolve_precision("fp32", "cpu", _probe()).name == "fp32"
    kept = P.Precision("bf16", "kept from the run's checkpoint step_00000002")
    assert P.resolve_precision("auto", "cpu", _probe(), kept=kept) == kept
    assert P.resolve_precision("fp32", "cpu", _probe(), kept=kept).name == "fp32"
    assert calls == []


def test_real_measurement_times_the_step_in_both_precisions():
    """The real `measure` runs the step under autocast off and bf16, alternating."""
    layer, x, seen = torch.nn.Linear(32, 32), torch.randn(8, 32), []
    ratios = probe_mod.measure(lambda: seen.append(layer(x).dtype))
    assert probe_mod.MIN_ROUNDS <= len(ratios) <= probe_mod.MAX_ROUNDS
    assert all(r > 0 for r in ratios)
    assert seen[:4] == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    assert seen[4:6] == [torch.bfloat16, torch.float32]  # the second round starts with bf16
    assert len(seen) == 2 + 2 * len(ratios)


def test_forward_probe_runs_the_model_without_gradients():
    model = DiT(DiTConfig(vocab_size=50, n_layers=1, d_model=16, n_heads=2, max_seq_len=8))
    probe = P.forward_probe(model, 3, 8, 50)
    probe.run()
    assert probe.shape == f"forward of {P.model_shape(model)}, B=3 L=8"
    assert P.model_shape(model).startswith("DiT d=16 0.0")
    assert all(p.grad is None for p in model.parameters())


def test_bad_precisions_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="unknown train.precision 'bf32'.*auto, fp32, bf16"):
        P.resolve_precision("bf32", "cpu", _probe(), key="train.precision")
    with pytest.raises(ValueError, match="fp16 is not supported on CPU; use bf16, fp32 or auto"):
        P.resolve_precision("fp16", "cpu", _probe())


def test_autocast_context_sets_the_matmul_dtype():
    layer, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with P.Precision("bf16", "test").autocast("cpu"):
        assert layer(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), P.Precision("fp32", "t").autocast("cpu"):
        assert layer(x).dtype == torch.float32  # fp32 switches an outer autocast off


def test_model_width_is_the_hidden_size():
    model = DiT(DiTConfig(vocab_size=50, n_layers=2, d_model=48, n_heads=2, max_seq_len=16))
    assert P.model_width(model) == 48
    with pytest.raises(ValueError, match="no 2-D weights"):
        P.model_width(torch.nn.LayerNorm(4))
