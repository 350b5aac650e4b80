"""Precision: `auto` decides from the measured step once per machine and records it; explicit
choices are obeyed everywhere."""

import contextlib
import io
import json
import re
import sys

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
    with pytest.raises(ValueError) as err:
        P.model_width(torch.nn.LayerNorm(4))
    assert str(err.value) == "LayerNorm has no 2-D weights to read its width from"


# ---------------------------------------------------------------- the cache: what, when
def _reason(speedup: str, side: str, rounds: str) -> str:
    return (
        f"bf16 ran the {_probe().shape} at {speedup}x fp32's speed{rounds}, {side} the 1.2x "
        f"bf16 needs on {torch.backends.cpu.get_cpu_capability()}"
    )


def test_the_record_its_reasons_and_its_file(measured, monkeypatch, tmp_path, capsys):
    """The measured choice is recorded as name / speedup (3 decimals) / rounds / date, in
    precision.json beside its lock file and nothing else; both reasons name the file."""
    measured([1.23456] * 5)
    cache = tmp_path / "cache" / "a" / "b"  # nested, created
    monkeypatch.setenv("XDLM_CACHE_DIR", str(cache))
    path = cache / "precision.json"
    first = P.resolve_precision("auto", "cpu", _probe())
    assert capsys.readouterr().err == (
        f"precision=auto: timing the {_probe().shape} in fp32 and bf16 (once for this machine, "
        f"recorded in {path})\n"
    )
    assert first == P.Precision(
        "bf16", f"{_reason('1.24', 'at least', ' (median of 5 rounds)')}; measured now, "
        f"recorded in {path}"
    )  # fmt: skip
    (entry,) = json.loads(path.read_text()).values()
    assert sorted(entry) == ["date", "name", "rounds", "speedup"]
    assert (entry["name"], entry["speedup"], entry["rounds"]) == ("bf16", 1.235, 5)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", entry["date"])
    assert sorted(p.name for p in cache.iterdir()) == ["precision.json", "precision.lock"]
    again = P.resolve_precision("auto", "cpu", _probe())
    assert again.reason == (
        f"cached from {entry['date']} in {path}: "
        f"{_reason('1.24', 'at least', ' (median of 5 rounds)')}"
    )


def test_a_record_without_rounds_is_read(measured, tmp_path):
    """Records written before `rounds` existed: the reason names no rounds."""
    calls = measured([2.0] * 5)
    P.resolve_precision("auto", "cpu", _probe())
    path = tmp_path / "cache" / "precision.json"
    record = json.loads(path.read_text())
    (key,) = record
    del record[key]["rounds"]
    path.write_text(json.dumps(record))
    chosen = P.resolve_precision("auto", "cpu", _probe())
    assert chosen.reason.endswith(f": {_reason('2.00', 'at least', '')}") and len(calls) == 1


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "fp16", "speedup": 2.0, "date": "d"},
        {"name": "bf16", "speedup": "2.0", "date": "d"},
        {"name": "bf16", "speedup": 2.0, "date": 5},
        {"speedup": 2.0, "date": "d"},
        ["bf16", 2.0, "d"],
    ],
)
def test_an_invalid_record_is_measured_again(measured, tmp_path, entry):
    calls = measured([0.5] * 5)
    P.resolve_precision("auto", "cpu", _probe())
    path = tmp_path / "cache" / "precision.json"
    (key,) = json.loads(path.read_text())
    path.write_text(json.dumps({key: entry}))
    assert P.resolve_precision("auto", "cpu", _probe()).name == "fp32" and len(calls) == 2
    assert json.loads(path.read_text())[key]["name"] == "fp32"  # rewritten


def test_a_record_file_that_is_not_an_object_is_measured_again(measured, tmp_path):
    calls = measured([0.5] * 5)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "precision.json").write_text("[1, 2]")
    assert P.resolve_precision("auto", "cpu", _probe()).name == "fp32" and len(calls) == 1


def test_a_record_that_cannot_be_written_leaves_no_temporary(measured, tmp_path, capsys):
    """precision.json is a directory: the lock works, the write fails; the choice holds for
    this process and no temporary file is left in the cache."""
    measured([0.5] * 5)
    (tmp_path / "cache" / "precision.json").mkdir(parents=True)
    chosen = P.resolve_precision("auto", "cpu", _probe())
    assert chosen.reason == (
        f"{_reason('0.50', 'below', ' (median of 5 rounds)')}; measured now, not recorded: "
        "cache not writable"
    )
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "precision.json", "precision.lock",
    ]  # fmt: skip


def test_an_unwritable_cache_directory_says_so_before_measuring(measured, tmp_path, capsys):
    (tmp_path / "cache").write_text("a file where the directory should be")
    measured([0.5] * 5)
    P.resolve_precision("auto", "cpu", _probe())
    assert capsys.readouterr().err == (
        f"precision=auto: timing the {_probe().shape} in fp32 and bf16 (cache not writable)\n"
    )


def test_recorded_choices_are_this_machines_only(measured, tmp_path):
    measured([0.5] * 5)
    P.resolve_precision("auto", "cpu", _probe("B=1 L=1"))
    path = tmp_path / "cache" / "precision.json"
    record = json.loads(path.read_text())
    (entry,) = record.values()
    record["Other CPU | AVX2 | 2 threads | torch 0 | B=1 L=1"] = entry
    path.write_text(json.dumps(record))
    assert probe_mod.recorded_choices() == {"B=1 L=1": entry}


# ---------------------------------------------------------------- Precision, devices, probes
def test_precision_dtypes_and_their_autocast():
    assert [P.Precision(n, "").dtype for n in ("fp32", "bf16", "fp16")] == [
        torch.float32, torch.bfloat16, torch.float16,
    ]  # fmt: skip
    layer, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with P.Precision("fp16", "t").autocast("cpu"):
        assert layer(x).dtype == torch.float16
    assert isinstance(P.Precision("bf16", "t").autocast("meta"), contextlib.nullcontext)


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # a machine without a GPU
@pytest.mark.parametrize("device", ["cuda", "mps", "xpu"])
def test_autocast_covers_the_accelerators(device):
    ctx = P.Precision("bf16", "t").autocast(device)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert P.Precision("bf16", "why").describe() == "precision bf16 (why)"


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_on_cuda_asks_the_device_and_elsewhere_uses_fp32(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU at {device}")
    name = "GPU at cuda:1"  # the run's device, not the current one
    want = ("bf16", f"{name} supports bf16") if bf16 else ("fp32", f"{name} lacks fast bf16")
    chosen = P.resolve_precision("auto", "cuda:1", _probe())
    assert (chosen.name, chosen.reason) == want
    assert P.resolve_precision("auto", "meta", _probe()) == P.Precision(
        "fp32", "auto uses fp32 on meta"
    )


def test_explicit_choices_and_the_default_key():
    assert P.resolve_precision("bf16", "cpu", _probe()) == P.Precision("bf16", "set explicitly")
    assert P.resolve_precision("fp16", "cuda", _probe()).name == "fp16"
    with pytest.raises(ValueError) as err:
        P.resolve_precision("half", "cpu", _probe())
    assert str(err.value) == "unknown precision 'half'; choose one of auto, fp32, bf16, fp16"


def test_model_width_reads_two_dimensional_weights_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))  # (8, 4), 1-D 8s
    assert P.model_width(model) == 4


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.calls = torch.nn.Parameter(torch.ones(1, 1)), []

    def forward(self, z, t):
        self.calls.append((z, t, torch.is_grad_enabled()))
        return self.w * z.float()


def test_forward_probe_feeds_tokens_below_the_vocabulary_at_half_time(capsys):
    model = _Recorder()
    probe = P.forward_probe(model, 3, 5, 4)
    probe.run()
    ((z, t, grad),) = model.calls
    assert z.shape == (3, 5) and z.dtype == torch.int64 and 0 <= z.min() and z.max() < 4
    assert torch.equal(t, torch.full((3,), 0.5)) and not grad
    before = torch.get_rng_state()
    again = _Recorder()
    P.forward_probe(again, 3, 5, 4).run()  # the same input every time, the global RNG untouched
    assert torch.equal(again.calls[0][0], z) and torch.equal(torch.get_rng_state(), before)
    assert P.inference_precision("fp32", "cpu", model, 3, 5, 4).name == "fp32"
    assert capsys.readouterr().err == "precision fp32 (set explicitly)\n"
    with pytest.raises(ValueError, match="^unknown --precision 'x'"):
        P.inference_precision("x", "cpu", model, 3, 5, 4)


def test_cpu_description_names_model_capability_and_threads():
    assert P.cpu_description() == {
        "cpu": probe_mod.cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def test_inference_auto_times_the_forward(measured, capsys):
    calls = measured([0.5] * 5)
    model = _Recorder()
    assert P.inference_precision("auto", "cpu", model, 2, 3, 4).name == "fp32"
    (step,) = calls
    step()
    ((z, _, _),) = model.calls
    assert z.shape == (2, 3)
    assert "timing the forward of _Recorder d=1 0.00M params, B=2 L=3" in capsys.readouterr().err


def test_the_timing_line_is_flushed_before_measuring(measured, monkeypatch):
    """The line shows before a measurement that can take 30 s (stderr may be a pipe)."""
    out, seen = _Stream(), []
    monkeypatch.setattr(sys, "stderr", out)

    def fake(step):
        seen.append(out.flushed)
        return [0.5] * 5

    monkeypatch.setattr(probe_mod, "measure", fake)
    P.resolve_precision("auto", "cpu", _probe())
    assert seen == [out.getvalue()] and seen[0].startswith("precision=auto: timing the ")


class _Stream(io.StringIO):
    flushed = ""

    def flush(self) -> None:
        self.flushed = self.getvalue()


def test_an_fp32_record_is_read_back(measured):
    calls = measured([0.5] * 5)
    P.resolve_precision("auto", "cpu", _probe())
    again = P.resolve_precision("auto", "cpu", _probe())
    assert again.name == "fp32" and again.reason.startswith("cached from") and len(calls) == 1


def test_a_full_disk_measures_once_and_leaves_no_temporary(measured, tmp_path, monkeypatch):
    """The record's write fails before its temporary exists (ENOSPC): the choice holds for this
    process, measured once."""
    import errno

    calls = measured([0.5] * 5)
    (tmp_path / "cache").mkdir()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(probe_mod.Path, "write_text", full)
    chosen = P.resolve_precision("auto", "cpu", _probe())
    assert chosen.reason.endswith("measured now, not recorded: cache not writable")
    assert len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["precision.lock"]
