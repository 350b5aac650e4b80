"""The MDLM-lineage "DDiT" backbone, exactly as released MDLM / UDLM / Duo / XDLM weights need it.

Our own `DiT` (models/dit.py) is a cleaner variant (bias-free, adaLN only with time conditioning);
the released checkpoints of the field were trained with this one, which differs in every detail
that changes the logits, so importing them needs the architecture reproduced exactly:

    z_t (B, L) -> embedding E[z_t] (B, L, D)
    c = SiLU(MLP(sinusoid(s))) (B, cond_dim), s the time input below (s = 0 without conditioning)
    n_layers x block:
        (shift, scale, gate) x 2 = adaLN(c)          (a Linear with bias, always present)
        x = x + gate1 · W_o attn(RoPE(W_qkv · mod(LN(x), shift1, scale1)))    (qkv, out: no bias)
        x = x + gate2 · MLP(mod(LN(x), shift2, scale2))     (D -> 4D -> GELU(tanh) -> D, biases)
    logits = W_out · mod(LN(x), adaLN_final(c)) + b_out   (B, L, V)

with mod(y, shift, scale) = y·(1 + scale) + shift and LN a LayerNorm without bias (eps 1e-5,
computed in float32 or wider) times a learnt weight. The adaLN modulation is applied even when the
model is not time-conditioned: c is then the constant SiLU(MLP(sinusoid(0))), and the trained
modulation weights still shape every block. RoPE is the non-interleaved ("rotate half") form on
q and k over the full head dimension, base 10,000. Attention is full and bidirectional, with
softmax scale 1/sqrt(head_dim); upstream attends to every position (no padding mask), which
`attention_mask=None` reproduces.

Time input (`time_input`), the scalar s the timestep embedding sees, per source:
  - "none":  s = 0 for every t (MDLM, XDLM and Duo with `time_conditioning=False`; the released
             mdlm-owt);
  - "sigma": s = σ_t = −log α_t = −log(1 − (1 − ε)t), the log-linear total noise (UDLM, and any
             of the above trained with `time_conditioning=True`);
  - "t":     s = t', the time of upstream's `training.change_of_variables` runs (MDLM / UDLM
             code with `time_conditioning=True`): they train on noise with move chance
             m(t') = exp(f_0 + t'·(f_T − f_0)), f_0 = log(1 − e^{−ε}), f_T = log(1 − ε), and
             condition on t' itself, so at our log-linear time t (1 − α_t = (1 − ε)·t) the
             network sees t' = (log((1 − ε)·t) − f_0) / (f_T − f_0), clamped at 0 (below
             m(0) ≈ ε the run saw no noise level) — `change_of_variables_time`.
No factor 1000 is applied (unlike our own DiT).

Not a `HiddenDenoiser`: the output projection has a bias, which the fused loss would drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import LongTensor, Tensor, nn

from xdlm.models.dit import _key_mask, _modulate

TIME_INPUTS = ("none", "sigma", "t")


def change_of_variables_time(t: Tensor, eps: float) -> Tensor:
    """t' (B,) of a `change_of_variables` run at our log-linear time t (B,) (module docstring):
    m(t') = 1 − α_t, i.e. t' = (log((1 − ε)·t) − f_0) / (f_T − f_0), clamped at 0."""
    f_0, f_T = math.log(-math.expm1(-eps)), math.log1p(-eps)
    return ((torch.log((1.0 - eps) * t) - f_0) / (f_T - f_0)).clamp_min(0.0)


@dataclass(frozen=True)
class MDLMDiTConfig:
    """An upstream DDiT's sizes (its `hidden_size` / `n_blocks` are d_model / n_layers here)."""

    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    cond_dim: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    time_input: str = "none"
    sigma_eps: float = 1e-3
    norm_eps: float = 1e-5
    rope_base: float = 10_000.0
    freq_dim: int = 256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "cond_dim", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"MDLMDiTConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} must be n_heads={self.n_heads} times an even head size"
            )
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {self.time_input!r}; choose one of {TIME_INPUTS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MDLMDiTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class ScaledLayerNorm(nn.Module):
    """LayerNorm without affine parameters (in float32 or wider), then times `weight` (D,)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)
        y = F.layer_norm(x.to(wide), (x.shape[-1],), eps=self.eps)
        return y * self.weight


def sinusoid(s: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """[cos(s·f), sin(s·f)] (B, dim) with f_j = max_period^(−j / (dim/2)), in s's dtype (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=s.dtype) / half)
    args = s[:, None] * freqs.to(s.device)[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin (L, head_dim / 2) computed in float64, cast to `like`'s dtype and device."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().to(like), angles.sin().to(like)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Non-interleaved RoPE on x (B, L, H, Dh): pairs (x_i, x_{i + Dh/2}); cos, sin (L, Dh/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class DDiTBlock(nn.Module):
    """One upstream block: adaLN-modulated attention and MLP with gated residuals."""

    def __init__(self, cfg: MDLMDiTConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.n_heads, self.p = cfg.n_heads, cfg.dropout
        self.norm1 = ScaledLayerNorm(D, cfg.norm_eps)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.norm2 = ScaledLayerNorm(D, cfg.norm_eps)
        self.mlp_in = nn.Linear(D, cfg.mlp_ratio * D)
        self.mlp_out = nn.Linear(cfg.mlp_ratio * D, D)
        self.modulation = nn.Linear(cfg.cond_dim, 6 * D)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, c: Tensor, key_mask) -> Tensor:
        """x (B, L, D), c (B, cond_dim), key_mask (B, 1, 1, L) bool or None -> (B, L, D)."""
        B, L, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(c)[:, None].chunk(6, dim=-1)
        h = _modulate(self.norm1(x), sh1, sc1).to(x.dtype)
        q, k, v = self.qkv(h).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask
        )
        y = self.attn_out(y.transpose(1, 2).reshape(B, L, D))
        x = x + g1 * F.dropout(y, self.p, self.training)
        h = _modulate(self.norm2(x), sh2, sc2).to(x.dtype)
        y = self.mlp_out(F.gelu(self.mlp_in(h), approximate="tanh"))
        return x + g2 * F.dropout(y, self.p, self.training)


class MDLMDiT(nn.Module):
    """The upstream DDiT as a `Denoiser`: `model(z_t, t, attention_mask) -> logits (B, L, V)`."""

    def __init__(self, cfg: MDLMDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.time_in = nn.Linear(cfg.freq_dim, cfg.cond_dim)
        self.time_out = nn.Linear(cfg.cond_dim, cfg.cond_dim)
        self.blocks = nn.ModuleList(DDiTBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = ScaledLayerNorm(cfg.d_model, cfg.norm_eps)
        self.final_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.d_model)
        self.output_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Upstream init for training from scratch: normal(0.02) weights, zero biases, unit norms,
        zero adaLN and zero output head (the model starts at uniform logits)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, ScaledLayerNorm):
                nn.init.ones_(module.weight)
        for mod in [b.modulation for b in self.blocks] + [self.final_modulation, self.output_head]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def time_scalar(self, t: Tensor | None, batch: int, like: Tensor) -> Tensor:
        """s (B,), the timestep-embedding input for diffusion time t (B,) (module docstring)."""
        mode = self.cfg.time_input
        if mode == "none":
            return torch.zeros(batch, dtype=like.dtype, device=like.device)
        if t is None:
            raise ValueError(f"this model has time_input={mode!r} and needs t (B,), got None")
        t = t.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))
        if mode == "sigma":
            return -torch.log1p(-(1.0 - self.cfg.sigma_eps) * t)
        return change_of_variables_time(t, self.cfg.sigma_eps)

    def conditioning(self, t: Tensor | None, batch: int, like: Tensor) -> Tensor:
        """c = SiLU(time_out(SiLU(time_in(sinusoid(s))))) (B, cond_dim)."""
        s = self.time_scalar(t, batch, like)
        freq = sinusoid(s, self.cfg.freq_dim).to(like.dtype)
        return F.silu(self.time_out(F.silu(self.time_in(freq))))

    def forward(
        self,
        z_t: LongTensor,
        t: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cond: LongTensor | None = None,
    ) -> Tensor:
        """Logits (B, L, V) for ids z_t (B, L) at time t (B,); attention_mask (B, L) True = real."""
        if cond is not None:
            raise ValueError("MDLMDiT is unconditional; pass cond=None")
        if z_t.dim() != 2:
            raise ValueError(f"z_t must be (B, L) token ids, got shape {tuple(z_t.shape)}")
        x = self.embed(z_t)
        c = self.conditioning(t, z_t.shape[0], x)
        cos, sin = self._rotary(z_t.shape[1], x)
        key_mask = _key_mask(attention_mask, z_t.shape)
        for block in self.blocks:
            x = block(x, cos, sin, c, key_mask)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=-1)
        return self.output_head(_modulate(self.final_norm(x), shift, scale).to(x.dtype))

    def _rotary(self, seq_len: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE tables for this length, dtype and device, computed once (not state)."""
        key = (seq_len, like.dtype, like.device)
        if key not in self._rope_cache:
            self._rope_cache[key] = rotary_cos_sin(
                seq_len, self.cfg.head_dim, self.cfg.rope_base, like
            )
        return self._rope_cache[key]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
