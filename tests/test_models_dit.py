"""Properties of the native DiT backbone: shapes, attention structure, conditioning, presets."""

from __future__ import annotations

import math

import pytest
import torch

from xdlm.models.dit import PRESETS, DiT, DiTConfig
from xdlm.models.protocol import Denoiser, HiddenDenoiser

V, L = 50, 12


def tiny(**overrides) -> DiT:
    cfg = DiTConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=64)
    return DiT(DiTConfig(**{**cfg.__dict__, **overrides})).eval()


def randomize_modulation(model: DiT) -> DiT:
    """adaLN layers start at zero (no effect of t); give them weights to test the wiring."""
    with torch.no_grad():
        for mod in [b.modulation for b in model.blocks] + [model.final_modulation]:
            mod.weight.normal_(std=0.3)
            mod.bias.normal_(std=0.3)
    return model


def ids(B: int = 2, n: int = L) -> torch.Tensor:
    return torch.randint(0, V, (B, n))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_shapes_dtype_and_protocols(tie, time_conditioning):
    model = tiny(tie_embeddings=tie, time_conditioning=time_conditioning, num_classes=3)
    z, t = ids(), torch.rand(2)
    logits = model(z, t, torch.ones(2, L, dtype=torch.bool), torch.tensor([0, 2]))
    assert logits.shape == (2, L, V) and logits.dtype == torch.float32
    assert model.hidden(z, t).shape == (2, L, 32)
    assert isinstance(model, Denoiser) and isinstance(model, HiddenDenoiser)


def test_forward_equals_output_head_of_hidden():
    model = randomize_modulation(tiny(time_conditioning=True, num_classes=2))
    z, t, m, c = ids(), torch.rand(2), torch.rand(2, L) > 0.3, torch.tensor([1, 0])
    assert torch.equal(model(z, t, m, c), model.output_head(model.hidden(z, t, m, c)))


def test_bidirectional():
    model, z, j = tiny(), ids(1), 5
    z2 = z.clone()
    z2[0, j] = (z[0, j] + 1) % V
    diff = (model(z, None) - model(z2, None)).abs().amax(-1)[0]
    assert (diff[:j] > 1e-6).all() and (diff[j + 1 :] > 1e-6).all()


@pytest.mark.parametrize("conditioned", [False, True])
def test_padding_never_leaks_into_real_positions(conditioned):
    model = tiny(time_conditioning=conditioned, num_classes=3 if conditioned else 0)
    model = randomize_modulation(model) if conditioned else model
    t, c = torch.rand(2), (torch.tensor([2, 0]) if conditioned else None)
    lengths = torch.tensor([7, L])
    mask = torch.arange(L)[None] < lengths[:, None]
    z = ids()
    z_other = torch.where(mask, z, torch.randint(0, V, (2, L)))
    out = model(z, t, mask, c)
    out_other = model(z_other, t, mask, c)
    torch.testing.assert_close(out[mask], out_other[mask], atol=1e-5, rtol=0)
    for b, n in enumerate(lengths.tolist()):
        alone = model(z[b : b + 1, :n], t[b : b + 1], None, None if c is None else c[b : b + 1])
        torch.testing.assert_close(out[b, :n], alone[0], atol=1e-5, rtol=0)


def test_left_padding_matches_unpadded_by_relative_positions():
    model, z = tiny(), ids(1, 8)
    padded = torch.cat([torch.randint(0, V, (1, 4)), z], dim=1)
    mask = torch.arange(12)[None] >= 4
    torch.testing.assert_close(model(padded, None, mask)[:, 4:], model(z, None), atol=1e-5, rtol=0)


def test_fully_padded_row_is_finite():
    model = tiny()
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, :3] = True
    assert torch.isfinite(model(ids(), None, mask)).all()


def test_t_ignored_without_time_conditioning():
    model, z = tiny(), ids()
    ref = model(z, None)
    assert torch.equal(model(z, torch.zeros(2)), ref)
    assert torch.equal(model(z, torch.ones(2)), ref)


def test_t_used_with_time_conditioning():
    model, z = tiny(time_conditioning=True), ids()
    # adaLN-Zero: at initialisation t has no effect.
    torch.testing.assert_close(model(z, torch.zeros(2)), model(z, torch.ones(2)))
    randomize_modulation(model)
    assert not torch.allclose(model(z, torch.full((2,), 0.1)), model(z, torch.full((2,), 0.9)))
    with pytest.raises(ValueError, match="needs t"):
        model(z, None)


def test_class_conditioning_changes_output_and_none_is_null_class():
    model, z = tiny(num_classes=3), ids()
    assert not torch.allclose(model(z, None, cond=torch.tensor([0, 0])), model(z, None, cond=None))
    assert not torch.allclose(
        model(z, None, cond=torch.tensor([0, 0])), model(z, None, cond=torch.tensor([1, 1]))
    )
    torch.testing.assert_close(model(z, None), model(z, None, cond=torch.tensor([3, 3])))
    with pytest.raises(ValueError, match="num_classes"):
        tiny()(z, None, cond=torch.tensor([0, 1]))


def test_tied_embeddings_share_storage_and_count_once():
    tied, untied = tiny(tie_embeddings=True), tiny()
    assert tied.output_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == V * 32
    assert tied.num_params(exclude_embeddings=True) == untied.num_params(exclude_embeddings=True)


def test_gradients_reach_every_parameter():
    model = tiny(num_classes=2, tie_embeddings=True).train()
    z = ids()
    loss = torch.nn.functional.cross_entropy(
        model(z, None, cond=torch.tensor([0, 1])).flatten(0, 1), z.flatten()
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_on_cpu():
    model, z = tiny(time_conditioning=True, num_classes=2), ids()
    randomize_modulation(model)
    t, c = torch.rand(2), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(z, t, torch.rand(2, L) > 0.2, c)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_dropout_only_in_training():
    model, z = tiny(dropout=0.5), ids()
    assert torch.equal(model(z, None), model(z, None))
    model.train()
    assert not torch.equal(model(z, None), model(z, None))


def test_presets_build_on_meta_with_expected_sizes():
    with torch.device("meta"):
        small = DiT(DiTConfig.from_preset("small", vocab_size=50257))
    non_embedding = 12 * 12 * 768**2 + 25 * 768  # 12 blocks of 12·D² + 25 LayerNorm weights
    assert small.num_params(exclude_embeddings=True) == non_embedding  # 84.95M
    assert small.num_params() == non_embedding + 2 * 50257 * 768
    for name in PRESETS:
        cfg = DiTConfig.from_preset(name, vocab_size=100)
        assert cfg.vocab_size == 100
    assert DiTConfig.from_preset("tiny", 100, n_layers=3).n_layers == 3
    with pytest.raises(ValueError, match="valid presets.*small"):
        DiTConfig.from_preset("huge", 100)


@pytest.mark.parametrize("extra", [{}, {"time_conditioning": True, "num_classes": 3}])
def test_meta_then_init_weights_matches_eager_build(extra):
    """Meta build -> to_empty (filled with NaN) -> init_weights equals an eager build re-initialised
    from the same seed in EVERY parameter and buffer, and the init follows the module docstring:
    std 0.02, residual outputs 0.02/sqrt(2·n_layers), LayerNorm weights 1, biases and adaLN 0."""
    cfg = DiTConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=64, **extra)
    with torch.device("meta"):
        model = DiT(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan"))  # anything init_weights misses stays NaN
    torch.manual_seed(5)
    model.init_weights()
    eager = DiT(cfg)
    torch.manual_seed(5)
    eager.init_weights()
    got, want = model.state_dict(), eager.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    resid = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if "modulation" in name or name.endswith(".bias"):
            assert not p.any(), name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            std = resid if name.endswith(("attn.out.weight", "mlp.out.weight")) else 0.02
            assert float(p.detach().std()) == pytest.approx(std, rel=0.15), name
    cos = torch.cos(torch.arange(64.0)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2) / 8))
    torch.testing.assert_close(model.rope_cos, cos)
    z, t = ids(), torch.rand(2)
    torch.testing.assert_close(model(z, t), eager(z, t))


def test_flops_per_token_counts_per_token_matmuls_only():
    model = tiny()
    n_matmul = model.num_params() - V * 32 - 5 * 32  # minus input embedding and 5 LayerNorms
    assert model.flops_per_token(L) == 6 * n_matmul + 12 * 2 * 32 * L
    conditioned = tiny(time_conditioning=True, num_classes=3, tie_embeddings=True)
    assert conditioned.flops_per_token(L) == model.flops_per_token(L)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"d_model": 30}, "head size"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_classes": -1}, "num_classes"),
        ({"grid_width": -1}, "grid_width"),
        ({"grid_width": 4, "d_model": 24, "n_heads": 4}, "divisible by 4"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_input_validation():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long), None)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids(), None, torch.ones(2, L))


def _rotated_score(cos, sin, p: int, q: int, a: torch.Tensor, b: torch.Tensor) -> float:
    """<R_p a, R_q b> for one head: the attention logit of query a at p and key b at q."""
    from xdlm.models.dit import apply_rotary

    qa = apply_rotary(a[None, None, None], cos[p : p + 1], sin[p : p + 1])
    kb = apply_rotary(b[None, None, None], cos[q : q + 1], sin[q : q + 1])
    return float((qa * kb).sum())


def test_2d_rotary_scores_depend_on_row_and_column_offsets_only():
    """Axial RoPE on a W-wide grid: moving both pixels by whole rows or columns keeps the score
    (1-D RoPE would change it by the row step's phase at the wrap), and a vertical neighbour
    differs from a horizontal one."""
    from xdlm.models.dit import rotary_tables

    W, Dh = 5, 8
    cos, sin = rotary_tables(25, Dh, 10_000.0, grid_width=W)
    a, b = torch.randn(Dh, dtype=torch.float64), torch.randn(Dh, dtype=torch.float64)
    cos, sin = cos.double(), sin.double()
    base = _rotated_score(cos, sin, 6, 12, a, b)  # (1,1) -> (2,2)
    assert math.isclose(_rotated_score(cos, sin, 11, 17, a, b), base, rel_tol=1e-6)  # +1 row
    assert math.isclose(_rotated_score(cos, sin, 7, 13, a, b), base, rel_tol=1e-6)  # +1 column
    wrapped = _rotated_score(cos, sin, 4, 10, a, b)  # (0,4) -> (2,0): same 1-D offset 6
    assert not math.isclose(wrapped, base, rel_tol=1e-3)
    assert not math.isclose(_rotated_score(cos, sin, 6, 11, a, b),
                            _rotated_score(cos, sin, 6, 7, a, b), rel_tol=1e-3)  # fmt: skip
    # the row angles use the first Dh/4 pairs, the column angles the last Dh/4
    angles = torch.atan2(sin, cos)
    assert torch.allclose(angles[7, : Dh // 4], angles[5, : Dh // 4])  # both in row 1
    assert torch.allclose(angles[7, Dh // 4 :], angles[2, Dh // 4 :])  # both in column 2


def test_1d_rotary_is_the_default_and_grid_width_reaches_the_model():
    from xdlm.models.dit import rotary_tables

    cos, sin = rotary_tables(10, 8, 10_000.0)
    theta = 10_000.0 ** (-torch.arange(0, 8, 2) / 8)
    assert torch.allclose(cos, torch.cos(torch.arange(10.0)[:, None] * theta))
    flat, image = tiny(), tiny(grid_width=4)
    image.load_state_dict(flat.state_dict())  # same weights; the RoPE tables are not state
    x = ids()
    assert not torch.allclose(image(x, None), flat(x, None))  # only the positions differ
    from xdlm.builders import build_model
    from xdlm.config import ModelConfig

    built = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, rope_grid_width=14), 7)
    assert built.cfg.grid_width == 14


def test_absolute_positions_break_the_symmetry_of_an_all_mask_input():
    """Relative (rotary) positions alone give every position of a constant input the same output,
    so a fully masked image cannot be told apart by place; `abs_positions` can."""
    from xdlm.builders import build_model
    from xdlm.config import ModelConfig

    constant = torch.full((1, L), V - 1)
    out = tiny()(constant, None)[0]
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-5)
    placed = tiny(abs_positions=True)
    out = placed(constant, None)[0]
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    assert placed.pos_embed.weight.shape == (64, 32) and tiny().pos_embed is None
    with torch.no_grad():
        placed.pos_embed.weight.zero_()  # zero positions: the relative-only model, same weights
    plain = tiny()
    plain.load_state_dict({k: v for k, v in placed.state_dict().items() if "pos_embed" not in k})
    x = ids()
    assert torch.allclose(placed(x, None), plain(x, None), atol=1e-6)
    built = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, abs_positions=True), 7)
    assert built.cfg.abs_positions and built.pos_embed is not None
