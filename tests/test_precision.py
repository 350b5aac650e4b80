"""Precision: `auto` follows the measured bf16 speed; explicit choices are obeyed everywhere."""

import pytest
import torch

from xdlm import precision as P
from xdlm.models.dit import DiT, DiTConfig


@pytest.fixture
def probe(monkeypatch):
    """Replace the CPU probe by a fixed bf16 speed-up; records the widths it was asked about."""
    calls = []

    def set_speedup(value):
        def fake(width):
            calls.append(width)
            return value

        monkeypatch.setattr(P, "cpu_bf16_speedup", fake)
        return calls

    return set_speedup


def test_auto_on_cpu_follows_the_probe(probe):
    calls = probe(0.02)
    slow = P.resolve_precision("auto", "cpu", width=384)
    assert slow.name == "fp32" and slow.dtype == torch.float32
    assert "bf16 matmul 50.0x slower" in slow.describe() and calls == [384]
    probe(2.0)
    fast = P.resolve_precision("auto", "cpu", width=384)
    assert fast.name == "bf16" and fast.dtype == torch.bfloat16
    assert "bf16 matmul 2.0x faster" in fast.reason


@pytest.mark.parametrize("speedup", [0.02, 2.0])
def test_explicit_choice_is_obeyed_without_probing(probe, speedup):
    calls = probe(speedup)
    assert P.resolve_precision("bf16", "cpu").name == "bf16"
    assert P.resolve_precision("fp32", "cpu").name == "fp32"
    assert calls == []


def test_bad_precisions_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="unknown train.precision 'bf32'.*auto, fp32, bf16"):
        P.resolve_precision("bf32", "cpu", key="train.precision")
    with pytest.raises(ValueError, match="fp16 is not supported on CPU; use bf16, fp32 or auto"):
        P.resolve_precision("fp16", "cpu")


def test_autocast_context_sets_the_matmul_dtype():
    layer, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with P.Precision("bf16", "test").autocast("cpu"):
        assert layer(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), P.Precision("fp32", "t").autocast("cpu"):
        assert layer(x).dtype == torch.float32  # fp32 switches an outer autocast off


def test_real_probe_returns_a_positive_ratio_and_is_cached():
    P.cpu_bf16_speedup.cache_clear()
    first = P.cpu_bf16_speedup(256)
    assert first > 0 and P.cpu_bf16_speedup(256) == first
    assert P.cpu_bf16_speedup.cache_info().hits == 1


def test_model_width_is_the_hidden_size():
    model = DiT(DiTConfig(vocab_size=50, n_layers=2, d_model=48, n_heads=2, max_seq_len=16))
    assert P.model_width(model) == 48
    with pytest.raises(ValueError, match="no 2-D weights"):
        P.model_width(torch.nn.LayerNorm(4))
