"""EMA: update rule, warmup, swapping, serialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xdlm.models.dit import DiT, DiTConfig
from xdlm.models.ema import EMA


def test_update_math_without_warmup():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], 0.9 * start[n] + 0.1 * p.detach())
    assert ema.num_updates == 1


def test_warmup_decay_schedule():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.update(model)
    assert ema.current_decay() == pytest.approx(3 / 12)
    for _ in range(20):
        ema.update(model)
    assert ema.current_decay() == 0.5
    assert EMA(model, decay=0.99, warmup=False).current_decay() == 0.99


def test_shadow_is_float32_for_bf16_model():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.9)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    ema.update(model)
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16


def test_copy_to_and_swapped_restores_even_on_error():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.5, warmup=False)
    live = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.mul_(3.0)
    ema.update(model)
    trained = model.weight.detach().clone()
    with ema.swapped(model) as m:
        assert m is model
        torch.testing.assert_close(model.weight, ema.shadow["weight"])
        torch.testing.assert_close(ema.shadow["weight"], 0.5 * live + 0.5 * trained)
    assert torch.equal(model.weight, trained)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(model):
        raise RuntimeError("boom")
    assert torch.equal(model.weight, trained)
    ema.copy_to(model)
    assert torch.equal(model.weight, ema.shadow["weight"])


def test_state_dict_round_trip():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.95)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    other = EMA(nn.Linear(3, 3), decay=0.1, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert (other.decay, other.warmup, other.num_updates) == (0.95, True, 1)
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])
    with pytest.raises(ValueError, match="same architecture"):
        EMA(nn.Linear(3, 3, bias=False)).load_state_dict(ema.state_dict())


def test_tied_dit_and_mismatch_errors():
    cfg = DiTConfig(vocab_size=20, n_layers=1, d_model=16, n_heads=2, tie_embeddings=True)
    model = DiT(cfg)
    ema = EMA(model)
    assert "output_head.weight" not in ema.shadow and "embed.weight" in ema.shadow
    ema.update(model)
    with pytest.raises(ValueError, match="does not match"):
        ema.update(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
