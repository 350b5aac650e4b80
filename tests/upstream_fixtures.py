"""Test-only: tiny random checkpoints in the upstream MDLM-lineage layouts, and an independently
written float64 reference forward of the upstream DDiT (from the upstream code's structure:
`models/dit.py` of kuleshov-group/mdlm and s-sahoo/duo, the HF `modeling_mdlm.py`), which shares
no code with `xdlm.models.mdlm_dit`: explicit softmax attention, `rotate_half` RoPE on a
(freqs, freqs) table, hand-written LayerNorm and tanh-GELU.
"""

from __future__ import annotations

import math

import torch

SIZES = {"d": 32, "heads": 4, "layers": 2, "cond": 16}


def upstream_state_dict(vocab: int, gen: torch.Generator, sizes: dict = SIZES) -> dict:
    """Random `backbone.*` weights in upstream registration order (non-zero adaLN and head, so
    every term matters), plus the `rotary_emb.inv_freq` buffer."""
    d, c, dh = sizes["d"], sizes["cond"], sizes["d"] // sizes["heads"]

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    sd = {"backbone.vocab_embed.embedding": r(vocab, d, scale=1.0)}
    sd |= {"backbone.sigma_map.mlp.0.weight": r(c, 256), "backbone.sigma_map.mlp.0.bias": r(c)}
    sd |= {"backbone.sigma_map.mlp.2.weight": r(c, c), "backbone.sigma_map.mlp.2.bias": r(c)}
    sd["backbone.rotary_emb.inv_freq"] = 1.0 / (10_000 ** (torch.arange(0, dh, 2).float() / dh))
    for i in range(sizes["layers"]):
        p = f"backbone.blocks.{i}."
        sd |= {p + "norm1.weight": 1 + r(d), p + "attn_qkv.weight": r(3 * d, d)}
        sd |= {p + "attn_out.weight": r(d, d), p + "norm2.weight": 1 + r(d)}
        sd |= {p + "mlp.0.weight": r(4 * d, d), p + "mlp.0.bias": r(4 * d)}
        sd |= {p + "mlp.2.weight": r(d, 4 * d), p + "mlp.2.bias": r(d)}
        sd |= {p + "adaLN_modulation.weight": r(6 * d, c), p + "adaLN_modulation.bias": r(6 * d)}
    p = "backbone.output_layer."
    sd |= {p + "norm_final.weight": 1 + r(d), p + "linear.weight": r(vocab, d)}
    sd |= {p + "linear.bias": r(vocab), p + "adaLN_modulation.weight": r(2 * d, c)}
    sd[p + "adaLN_modulation.bias"] = r(2 * d)
    return sd


def shadow_params(sd: dict, gen: torch.Generator) -> list[torch.Tensor]:
    """An EMA `shadow_params` list: every parameter (not the buffer) perturbed, in order."""
    return [
        v + 0.05 * torch.randn(v.shape, generator=gen)
        for k, v in sd.items()
        if not k.endswith("inv_freq")
    ]


def _layer_norm(x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def reference_logits(
    sd: dict, ids: torch.Tensor, sigma: torch.Tensor, n_heads: int
) -> torch.Tensor:
    """Upstream DDiT forward in float64: ids (B, L), sigma (B,) = what the backbone is given
    (already zeroed by the caller when the model is not time-conditioned) -> (B, L, V)."""
    W = {k.removeprefix("backbone."): v.double() for k, v in sd.items()}
    B, L = ids.shape
    x = W["vocab_embed.embedding"][ids]
    D = x.shape[-1]
    dh = D // n_heads
    half = 128
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float64) / half)
    args = sigma.double()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    h = temb @ W["sigma_map.mlp.0.weight"].T + W["sigma_map.mlp.0.bias"]
    h = h * torch.sigmoid(h)
    c = h @ W["sigma_map.mlp.2.weight"].T + W["sigma_map.mlp.2.bias"]
    c = c * torch.sigmoid(c)
    inv = 1.0 / (10_000 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    f = torch.outer(torch.arange(L, dtype=torch.float64), inv)
    emb = torch.cat((f, f), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    i = 0
    while f"blocks.{i}.norm1.weight" in W:
        p = f"blocks.{i}."
        m = (c @ W[p + "adaLN_modulation.weight"].T + W[p + "adaLN_modulation.bias"])[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = m.chunk(6, dim=-1)
        a = _layer_norm(x) * W[p + "norm1.weight"] * (1 + sc1) + sh1
        qkv = (a @ W[p + "attn_qkv.weight"].T).view(B, L, 3, n_heads, dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        att = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v).reshape(B, L, D)
        x = x + g1 * (att @ W[p + "attn_out.weight"].T)
        a = _layer_norm(x) * W[p + "norm2.weight"] * (1 + sc2) + sh2
        u = _gelu_tanh(a @ W[p + "mlp.0.weight"].T + W[p + "mlp.0.bias"])
        x = x + g2 * (u @ W[p + "mlp.2.weight"].T + W[p + "mlp.2.bias"])
        i += 1
    m = c @ W["output_layer.adaLN_modulation.weight"].T + W["output_layer.adaLN_modulation.bias"]
    shift, scale = m[:, None].chunk(2, dim=-1)
    a = _layer_norm(x) * W["output_layer.norm_final.weight"] * (1 + scale) + shift
    return a @ W["output_layer.linear.weight"].T + W["output_layer.linear.bias"]


def with_shadow(sd: dict, shadow: list[torch.Tensor]) -> dict:
    """`sd` with its parameters replaced by the EMA shadow list (buffers kept)."""
    params = iter(shadow)
    return {k: (v if k.endswith("inv_freq") else next(params)) for k, v in sd.items()}
