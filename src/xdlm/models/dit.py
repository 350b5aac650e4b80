"""The native backbone: a bidirectional "DiT" transformer as in MDLM/UDLM/XDLM.

    z_t (B, L) -> token embedding (+ absolute position, + class embedding) -> n_layers x
    [pre-LN attention with RoPE on q, k and a key-padding mask; pre-LN GELU MLP]
    -> final LayerNorm -> output_head -> (B, L, V)

Choices (documented here once):
- Norms are LayerNorm without bias (as MDLM); all Linear layers are bias-free, so a block has
  exactly 12·D² parameters (4·D² attention + 8·D² MLP at mlp_ratio 4).
- Time conditioning (off by default) is MDLM-style adaLN: sinusoidal(1000·t) -> MLP -> SiLU gives
  a vector c (B, cond_dim); each block maps c to shift/scale/gate for attention and MLP, and the
  final norm gets its own shift/scale. All modulation layers start at zero ("adaLN-Zero"), so at
  initialisation every block is the identity and t has no effect until trained. When off, `t` is
  accepted and ignored.
- Positions are relative only (RoPE) by default, as MDLM's DiT for text. With
  `abs_positions` a learned embedding of each position (normal(0, 0.02) init) is added to the
  token embeddings: images need it, because a fully masked image is the same token everywhere
  and relative positions alone cannot tell the centre of a digit from its background.
- Class conditioning (num_classes > 0) is an additive embedding of the label on every position of
  the input stream, whether adaLN is on or not: one code path, and the label changes the output
  from initialisation. Row `num_classes` is the "null" class used for classifier-free guidance;
  `cond=None` means the null class.
- Init: normal(0, 0.02) for embeddings and Linear weights; the residual output projections
  (attention out, MLP out) use 0.02/sqrt(2·n_layers) (GPT-2). The output head is NOT zeroed:
  a zero head would give the backbone zero gradients on the first step and would not be possible
  when tied; with std 0.02 the initial logits are near zero and the initial loss is ≈ log V.
- `init_weights()` re-initialises everything (including the RoPE tables), so a model built on the
  meta device can be materialised with `to_empty(device=...)` then `init_weights()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import LongTensor, Tensor, nn


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a `DiT`. `num_classes = 0` is unconditional."""

    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    time_conditioning: bool = False
    cond_dim: int = 128
    num_classes: int = 0
    tie_embeddings: bool = False
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    rope_base: float = 10_000.0
    grid_width: int = 0  # > 0: 2-D (axial) rotary positions (p // W, p % W) for image tokens
    abs_positions: bool = False  # learned absolute position embeddings added to the tokens

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "cond_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DiTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} must be n_heads={self.n_heads} times an even head size "
                "(rotary embeddings rotate pairs); change d_model or n_heads"
            )
        if self.grid_width < 0 or (self.grid_width and self.head_dim % 4):
            raise ValueError(
                f"DiTConfig.grid_width={self.grid_width} must be >= 0, and 2-D rotary positions "
                f"need a head size divisible by 4 (got {self.head_dim})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DiTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            raise ValueError(f"DiTConfig.num_classes must be >= 0, got {self.num_classes}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_mlp(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides) -> DiTConfig:
        """A preset from `PRESETS` with the vocabulary size set and any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; valid presets: {sorted(PRESETS)}")
        return replace(PRESETS[name], vocab_size=vocab_size, **overrides)


# vocab_size=1 is a placeholder: `from_preset` always sets the real one.
PRESETS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(vocab_size=1, n_layers=2, d_model=128, n_heads=4),
    "small": DiTConfig(vocab_size=1, n_layers=12, d_model=768, n_heads=12),
    "medium": DiTConfig(vocab_size=1, n_layers=24, d_model=1024, n_heads=16),
}


def rotary_tables(
    seq_len: int, head_dim: int, base: float, device=None, grid_width: int = 0
) -> tuple[Tensor, Tensor]:
    """cos, sin tables (seq_len, head_dim // 2) for rotary position embedding (float32).

    1-D (grid_width = 0): pair i of position p turns by p·θ_i, θ_i = base^(−2i/Dh).
    2-D (grid_width = W > 0, axial RoPE for a row-major image): position p is the pixel
    (r, c) = (p // W, p % W); the first Dh/4 pairs turn by r·θ'_i and the last Dh/4 by c·θ'_i,
    θ'_i = base^(−4i/Dh), so attention scores depend on the row and column offsets."""
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    if grid_width == 0:
        even = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
        angles = pos[:, None] * base ** (-even / head_dim)
        return angles.cos(), angles.sin()
    quarter = torch.arange(0, head_dim, 4, device=device, dtype=torch.float32)
    inv_freq = base ** (-quarter / head_dim)  # (Dh/4,)
    rows, cols = torch.div(pos, grid_width, rounding_mode="floor"), pos % grid_width
    angles = torch.cat((rows[:, None] * inv_freq, cols[:, None] * inv_freq), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + Dh/2}) of x (B, H, L, Dh) by position; cos, sin (L, Dh/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of a scalar per sample t (B,), as in DiT/MDLM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with RoPE on q, k and a key-padding mask."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> Tensor:
        """x (B, L, D), key_mask (B, 1, 1, L) bool (True = may be attended) or None -> (B, L, D)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    """D -> mlp_ratio·D -> GELU(tanh) -> D."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block; with adaLN when `modulation` is present (time conditioning)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        adaln = cfg.time_conditioning
        self.modulation = nn.Linear(cfg.cond_dim, 6 * cfg.d_model) if adaln else None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None, c: Tensor | None
    ) -> Tensor:
        """x (B, L, D), c (B, cond_dim) or None -> (B, L, D)."""
        if self.modulation is None:
            x = x + self.drop(self.attn(self.norm1(x), cos, sin, key_mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(c)[:, None].chunk(6, dim=-1)
        x = x + g1 * self.drop(self.attn(_modulate(self.norm1(x), sh1, sc1), cos, sin, key_mask))
        return x + g2 * self.drop(self.mlp(_modulate(self.norm2(x), sh2, sc2)))


class TimeEmbedding(nn.Module):
    """t (B,) in [0, 1] -> sinusoidal(1000·t) -> Linear, SiLU, Linear -> SiLU: (B, cond_dim)."""

    freq_dim = 256

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(self.freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, t: Tensor) -> Tensor:
        return F.silu(self.mlp(timestep_embedding(1000.0 * t, self.freq_dim)))


class DiT(nn.Module):
    """Bidirectional transformer denoiser; satisfies `Denoiser` and `HiddenDenoiser`."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.abs_positions else None
        self.class_embed = (
            nn.Embedding(cfg.num_classes + 1, cfg.d_model) if cfg.num_classes > 0 else None
        )
        self.time_embed = TimeEmbedding(cfg.cond_dim) if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.final_modulation = (
            nn.Linear(cfg.cond_dim, 2 * cfg.d_model) if cfg.time_conditioning else None
        )
        self.output_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output_head.weight = self.embed.weight
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise all parameters and the RoPE tables in place (see module docstring)."""
        std, cfg = 0.02, self.cfg
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, std=std / math.sqrt(2 * cfg.n_layers))
            nn.init.normal_(block.mlp.out.weight, std=std / math.sqrt(2 * cfg.n_layers))
        for mod in [b.modulation for b in self.blocks] + [self.final_modulation]:
            if mod is not None:
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)
        cos, sin = rotary_tables(
            cfg.max_seq_len, cfg.head_dim, cfg.rope_base, self.rope_cos.device, cfg.grid_width
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _conditioning(
        self, t: Tensor | None, cond: LongTensor | None, x: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """(x + class embedding (B, L, D), adaLN vector c (B, cond_dim) or None)."""
        if cond is not None and self.class_embed is None:
            raise ValueError("cond was given but DiTConfig.num_classes == 0; set num_classes > 0")
        if self.class_embed is not None:
            if cond is None:
                cond = torch.full((x.shape[0],), self.cfg.num_classes, device=x.device)
            x = x + self.class_embed(cond)[:, None]
        if self.time_embed is None:
            return x, None
        if t is None:
            raise ValueError("this DiT has time_conditioning=True and needs t (B,), got None")
        return x, self.time_embed(t)

    def hidden(
        self,
        z_t: LongTensor,
        t: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cond: LongTensor | None = None,
    ) -> Tensor:
        """Final hidden states (B, L, D); `forward` is `output_head(hidden(...))`.

        Args: z_t (B, L) ids; t (B,) or None; attention_mask (B, L) bool, True = real token;
        cond (B,) class ids or None (= the null class when num_classes > 0).
        """
        if z_t.dim() != 2:
            raise ValueError(f"z_t must be (B, L) token ids, got shape {tuple(z_t.shape)}")
        L = z_t.shape[1]
        if L > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {L} > max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(z_t)
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[:L]
        x, c = self._conditioning(t, cond, x)
        key_mask = _key_mask(attention_mask, z_t.shape)
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        for block in self.blocks:
            x = block(x, cos, sin, key_mask, c)
        x = self.norm_f(x)
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=-1)
            x = _modulate(x, shift, scale)
        return x

    def forward(
        self,
        z_t: LongTensor,
        t: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cond: LongTensor | None = None,
    ) -> Tensor:
        """Logits (B, L, V) for noisy ids z_t (B, L); arguments as in `hidden`."""
        return self.output_head(self.hidden(z_t, t, attention_mask, cond))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights counted once); optionally without the token embedding
        and an untied output head (the usual "non-embedding" count)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.output_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6·N + 12·n_layers·D·seq_len.

        N counts the weights of the per-token matmuls: attention and MLP projections of every
        block and the output head (V·D, once even when tied). Embedding lookups, norms and the
        per-sequence conditioning layers (time MLP, adaLN modulations) are left out. The second
        term is QKᵀ and attention·V over the full (bidirectional) sequence.
        Use for MFU = tokens/s · flops_per_token / peak FLOP/s.
        """
        cfg = self.cfg
        per_block = 4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_mlp
        n = cfg.n_layers * per_block + cfg.vocab_size * cfg.d_model
        return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def _key_mask(attention_mask: Tensor | None, shape: torch.Size) -> Tensor | None:
    """(B, L) bool, True = real -> (B, 1, 1, L) SDPA mask (True = may be attended), or None.

    A row with no real token at all attends to everything instead (its outputs are meaningless
    but finite; an all-False row would give NaN that survives a 0-weighted loss).
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.shape != shape:
        raise ValueError(
            f"attention_mask must be a bool tensor of shape {tuple(shape)} like z_t, got "
            f"{attention_mask.dtype} "
            f"{tuple(attention_mask.shape)}"
        )
    empty = ~attention_mask.any(dim=-1, keepdim=True)
    return (attention_mask | empty)[:, None, None, :]
