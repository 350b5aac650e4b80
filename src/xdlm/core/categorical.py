"""Categorical sampling that is exact for large V, and the usual logit filters.

All functions take an explicit `torch.Generator` and never modify their inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_categorical(
    probs: Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Draw one index per row of `probs` (…, V) by inverse CDF in `dtype` -> LongTensor (…).

    Rows need not be normalised. With float64 the cumulative sum is exact enough for V ~ 10^5
    (float32 Gumbel-max is measurably biased there); a zero-probability index is never drawn.
    """
    cdf = probs.to(dtype, copy=True).cumsum_(-1)  # one (…, V) array in `dtype`, probs untouched
    u = torch.rand(cdf.shape[:-1], generator=generator, dtype=dtype, device=probs.device)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering; removed entries become −inf.

    (…, V) -> (…, V), a new tensor. temperature must be > 0; top_p in (0, 1].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use greedy decoding instead")
    out = logits / temperature if temperature != 1.0 else logits.clone()
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = out.topk(min(top_k, out.shape[-1]), dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the first token crossing p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def without_mask(logits: Tensor, mask_id: int | None) -> Tensor:
    """A copy of logits (…, V) with the mask logit at −inf, so p_θ(m) = 0 (unchanged if None)."""
    if mask_id is None:
        return logits
    col = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    col[mask_id] = True
    return logits.masked_fill(col, float("-inf"))


def denoiser_probs(
    logits: Tensor,
    mask_id: int | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """p_θ (…, V) in float32+: mask logit forced to −inf (p_θ(m) = 0), then the filters (none at
    the defaults: no extra (…, V) copy)."""
    logits = without_mask(logits, mask_id)
    if temperature != 1.0 or top_k is not None or top_p is not None:
        logits = filter_logits(logits, temperature, top_k, top_p)
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
