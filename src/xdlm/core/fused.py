"""Memory-light XDLM training loss: the NELBO fused into the output head.

`fused_nelbo` computes the NELBO integrand ℓ_t(x, z) (see `MixedKernel.nelbo`) straight from the
final hidden states h (B, L, D) and the output projection W (V, D): logits = h·Wᵀ + b are built
`chunk_size` tokens at a time, so the (B, L, V) logits, log p_θ and their gradients never exist.
Backward recomputes each chunk's logits, takes ∂ℓ/∂logits with autograd through the kernel's own
per-row formula (`MixedKernel.nelbo_rows`) and accumulates

    ∂/∂h_chunk = G·W,    ∂/∂W += Gᵀ·h_chunk,    ∂/∂b += Σ_rows G        (G = ∂ℓ/∂logits_chunk).

Peak extra memory is O(chunk_size·V + V·D) instead of a handful of B·L·V tensors; the cost is one
more h·Wᵀ matmul per chunk in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xdlm.core.kernel import MixedKernel
from xdlm.core.logit_stats import CHUNK_ELEMENTS
from xdlm.core.objective import LossOutput, corrupt_batch, reduce_loss
from xdlm.core.schedules import Schedule


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one chunk of logits holds about `CHUNK_ELEMENTS` values."""
    return max(16, CHUNK_ELEMENTS // vocab_size)


class _FusedNelbo(torch.autograd.Function):
    """ℓ (N,) from h (N, D), W (V, D), b (V,) | None, chunked over the N rows."""

    @staticmethod
    def forward(ctx, h, weight, bias, kernel, x0, z_t, alpha, dalpha, chunk):
        ctx.kernel, ctx.chunk = kernel, chunk
        ctx.small_lambda = kernel.has_small_lambda(alpha)  # once, not once per chunk
        ctx.autocast = (h.device.type, torch.is_autocast_enabled(h.device.type))
        ctx.autocast_dtype = torch.get_autocast_dtype(h.device.type)
        ctx.save_for_backward(h, weight, bias, x0, z_t, alpha, dalpha)
        out = h.new_empty(h.shape[0], dtype=torch.promote_types(h.dtype, torch.float32))
        for s in range(0, h.shape[0], chunk):
            e = s + chunk
            logits = F.linear(h[s:e], weight, bias)
            out[s:e] = kernel.nelbo_rows(
                logits, x0[s:e], z_t[s:e], alpha[s:e], dalpha[s:e], ctx.small_lambda
            )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, x0, z_t, alpha, dalpha = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        device_type, autocast_on = ctx.autocast
        for s in range(0, h.shape[0], ctx.chunk):
            e = s + ctx.chunk
            with torch.autocast(device_type, ctx.autocast_dtype, enabled=autocast_on):
                with torch.no_grad():
                    logits = F.linear(h[s:e], weight, bias)
            with torch.enable_grad():
                logits.requires_grad_(True)
                ell = ctx.kernel.nelbo_rows(
                    logits, x0[s:e], z_t[s:e], alpha[s:e], dalpha[s:e], ctx.small_lambda
                )
                (g,) = torch.autograd.grad(ell, logits, grad_out[s:e])
            if need_h:
                grad_h[s:e] = g @ weight.to(g.dtype)
            if need_w:
                grad_w.addmm_(g.mT.to(grad_w.dtype), h[s:e].to(grad_w.dtype))
            if need_b:
                grad_b.add_(g.sum(0))
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def fused_nelbo(
    hidden: Tensor,
    weight: Tensor,
    kernel: MixedKernel,
    x0: Tensor,
    z_t: Tensor,
    alpha: Tensor,
    dalpha: Tensor,
    *,
    chunk_size: int | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """ℓ_t(x0, z_t) (B, L) = `kernel.nelbo(hidden @ weight.T + bias, x0, z_t, alpha, dalpha)`.

    Args:
        hidden: h (B, L, D), the final hidden states (e.g. `DiT.hidden(...)`).
        weight: W (V, D), the output projection (`model.output_head.weight`).
        kernel: the MixedKernel (its V must equal weight.shape[0]).
        x0, z_t: LongTensor (B, L) clean and noisy ids.
        alpha, dalpha: α_t, α'_t (B,). No gradient flows to them (times are not learned).
        chunk_size: tokens per chunk (default `default_chunk_size(V)`, ~16 MB of float32 logits).
        bias: b (V,) or None.

    Gradients flow to hidden, weight and bias; autocast (e.g. bf16) applies to the chunk matmuls
    in forward and backward alike. Padding: ℓ is computed everywhere; zero it as you would the
    unfused loss (`reduce_loss`).
    """
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"need hidden (B, L, D) and weight (V, D) with the same D; got hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    B, L, D = hidden.shape
    if x0.shape != (B, L) or z_t.shape != (B, L) or alpha.shape != (B,) or dalpha.shape != (B,):
        raise ValueError(
            f"need x0, z_t (B, L)=({B}, {L}) and alpha, dalpha (B,); got x0 {tuple(x0.shape)}, "
            f"z_t {tuple(z_t.shape)}, alpha {tuple(alpha.shape)}, dalpha {tuple(dalpha.shape)}"
        )
    chunk = default_chunk_size(weight.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = (B * L,)
    per_row = _FusedNelbo.apply(
        hidden.reshape(B * L, D),
        weight,
        bias,
        kernel,
        x0.reshape(rows),
        z_t.reshape(rows),
        alpha.detach()[:, None].expand(B, L).reshape(rows),
        dalpha.detach()[:, None].expand(B, L).reshape(rows),
        chunk,
    )
    return per_row.reshape(B, L)


def fused_diffusion_loss(
    model,
    kernel: MixedKernel,
    schedule: Schedule,
    x0: Tensor,
    *,
    attention_mask: Tensor | None = None,
    cond: Tensor | None = None,
    loss_mask: Tensor | None = None,
    chunk_size: int | None = None,
    **corruption,
) -> LossOutput:
    """`diffusion_loss` for a `HiddenDenoiser`, with the loss fused into the output head.

    Same arguments (`corruption` = the keywords of `corrupt_batch`), same corruption path and
    same `LossOutput`; the model must expose `hidden(z_t, t, attention_mask, cond)` (B, L, D)
    and `output_head` (an nn.Linear with weight (V, D)).
    """
    batch = corrupt_batch(kernel, schedule, x0, attention_mask=attention_mask, **corruption)
    hidden = model.hidden(batch.z_t, batch.t, attention_mask=attention_mask, cond=cond)
    head = model.output_head
    per_token = fused_nelbo(
        hidden,
        head.weight,
        kernel,
        x0,
        batch.z_t,
        batch.alpha,
        batch.dalpha,
        chunk_size=chunk_size,
        bias=head.bias,
    )
    return reduce_loss(per_token, batch, loss_mask if loss_mask is not None else attention_mask)
