"""Row statistics of log p_θ for the NELBO with one (N, V) tensor saved and one (N, V) gradient.

For logits (…, V), ids x, z (…) and an offset c (…), with log p_θ = log_softmax(logits) after
forcing the mask logit to −inf:

    lp_x = log p_θ(x),   lp_z = log p_θ(z),   S = Σ_e softplus(log p_θ(e) + c)

Autograd through `log_softmax`, two `gather`s and `softplus(·).sum` keeps log p_θ, a copy of
log p_θ + c and the masked logits, and builds one (N, V) gradient per op. Here a custom Function
saves only log p_θ, works through the rows in chunks (bounded temporaries) and writes the
logits' gradient into one buffer:

    ∂/∂logits = G − p_θ·Σ_e G(e),   G = σ(log p_θ + c)·∂S + onehot(x)·∂lp_x + onehot(z)·∂lp_z

(the mask column's gradient is 0, as for `masked_fill`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22  # values per row chunk of the temporaries (16 MB in float32)


class _LogitStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, x, z, c, mask_id):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        n, V = logits.shape
        chunk = max(1, CHUNK_ELEMENTS // V)
        logp = torch.empty(n, V, dtype=dtype, device=logits.device)
        sp = torch.empty(n, dtype=dtype, device=logits.device) if c is not None else None
        for s in range(0, n, chunk):
            lg = logits[s : s + chunk]
            if mask_id is not None:
                lg = lg.index_fill(-1, torch.tensor([mask_id], device=lg.device), float("-inf"))
            logp[s : s + chunk] = torch.log_softmax(lg, -1, dtype=dtype)
            if sp is not None:
                sp[s : s + chunk] = F.softplus(logp[s : s + chunk] + c[s : s + chunk, None]).sum(-1)
        ctx.save_for_backward(logp, x, z, c)
        ctx.mask_id, ctx.in_dtype = mask_id, logits.dtype
        lp_x = logp.gather(-1, x[:, None]).squeeze(-1)
        lp_z = logp.gather(-1, z[:, None]).squeeze(-1)
        return lp_x, lp_z, sp

    @staticmethod
    def backward(ctx, g_x, g_z, g_sp):
        logp, x, z, c = ctx.saved_tensors
        n, V = logp.shape
        chunk = max(1, CHUNK_ELEMENTS // V)
        grad = torch.empty_like(logp)
        for s in range(0, n, chunk):
            e = s + chunk
            G = grad[s:e]
            if c is not None and g_sp is not None:
                torch.sigmoid(logp[s:e] + c[s:e, None], out=G)
                G.mul_(g_sp[s:e, None])
            else:
                G.zero_()
            for ids, g in ((x, g_x), (z, g_z)):
                if g is not None:
                    G.scatter_add_(-1, ids[s:e, None], g[s:e, None].to(G.dtype))
            G.sub_(logp[s:e].exp() * G.sum(-1, keepdim=True))
            if ctx.mask_id is not None:
                G[:, ctx.mask_id] = 0.0
        return grad.to(ctx.in_dtype), None, None, None, None


def logit_stats(
    logits: Tensor, x: Tensor, z: Tensor, c: Tensor | None, mask_id: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(lp_x, lp_z, S) each shaped like x, from logits (…, V), x, z (…), c (…) or None (no S)."""
    shape, V = x.shape, logits.shape[-1]
    flat = (c.expand(shape).reshape(-1),) if c is not None else (None,)
    out = _LogitStats.apply(logits.reshape(-1, V), x.reshape(-1), z.reshape(-1), *flat, mask_id)
    return tuple(t.reshape(shape) if t is not None else None for t in out)
