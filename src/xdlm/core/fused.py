"""Memory-light XDLM training loss: the NELBO fused into the output head.

`fused_nelbo` computes the NELBO integrand ℓ_t(x, z) (see `MixedKernel.nelbo`) straight from the
final hidden states h (B, L, D) and the output projection W (V, D): logits = h·Wᵀ + b are built
a chunk of rows at a time, so the (B, L, V) logits, log p_θ and their gradients never exist.
The loss is a sum over rows, so while a chunk's logits are at hand the forward pass also forms
G = ∂(Σ m·ℓ)/∂logits_chunk in closed form (`core/fused_chunk.py`, docs/math.md §7.1) and
accumulates

    ∂/∂h_chunk = G·W,    ∂/∂W += Gᵀ·h_chunk,    ∂/∂b += Σ_rows G        (float32 accumulators);

backward only scales them by the incoming gradient. The logits are computed once. With
`recompute=True` the forward pass computes ℓ only and backward recomputes each chunk's logits
(one more h·Wᵀ; nothing of size (N, D) or (V, D) is held between forward and backward). Rows
per chunk are measured (`core/fused_plan.py`) unless `chunk_size` is given.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xdlm.core.fused_chunk import (
    RowTargets,
    StatGrads,
    forward_chunk,
    logit_grad,
    recompute_probs,
)
from xdlm.core.fused_plan import ChunkProbe, probe_for, row_chunks
from xdlm.core.kernel import MixedKernel
from xdlm.core.objective import LossOutput, corrupt_batch, reduce_loss
from xdlm.core.schedules import Schedule


@dataclass(frozen=True)
class _Spec:
    """One call's settings: row targets, row weights m (N,) | None, the dtype of the chunk
    matmuls, rows per chunk (None = probe) and the variant ("stored" or "recompute")."""

    targets: RowTargets
    row_weight: Tensor | None
    dtype: torch.dtype
    chunk: int | None
    variant: str
    compiled: bool = False

    def ops(self):
        """(forward_chunk, logit_grad), eager or `torch.compile`d (`compile_chunks=True`)."""
        return _compiled_ops() if self.compiled else (forward_chunk, logit_grad)

    @property
    def acc(self) -> torch.dtype:
        """dtype of the (n, V) arithmetic: float32 at least."""
        return torch.promote_types(self.dtype, torch.float32)


@dataclass(frozen=True)
class _RowOut:
    """Per-row outputs of the loss pass: ℓ (None once returned), lse (N,), statistic derivatives."""

    ell: Tensor | None
    lse: Tensor
    grads: StatGrads


class _Chunker:
    """Casts h, W, b once, owns two reusable (rows, V) buffers and the accumulated gradients."""

    def __init__(self, h, weight, bias, spec: _Spec, probe: ChunkProbe | None, need=(0, 0, 0)):
        dt = spec.dtype
        self.h, self.w = h.to(dt), weight.to(dt)
        self.b = None if bias is None else bias.to(dt)
        self.spec, self.probe, self.device = spec, probe, h.device
        rows = spec.chunk if probe is None else max(probe.candidates)
        rows = min(rows, h.shape[0])
        self.buf, self.spare = (
            torch.empty(rows, weight.shape[0], dtype=spec.acc, device=h.device) for _ in range(2)
        )
        acc_w = torch.promote_types(weight.dtype, torch.float32)
        self.gh = torch.empty_like(h) if need[0] else None
        self.gw = torch.zeros(weight.shape, dtype=acc_w, device=h.device) if need[1] else None
        self.gb = torch.zeros(weight.shape[0], dtype=acc_w, device=h.device) if need[2] else None

    def chunks(self, timed: bool = True):
        fixed = self.spec.chunk
        if fixed is None and not timed:
            fixed = self.probe.chosen or max(self.probe.candidates)
        return row_chunks(self.h.shape[0], self.probe, fixed, self.device)

    def logits(self, s: int, e: int) -> Tensor:
        """logits = h·Wᵀ + b for rows [s, e) in the first buffer (n, V), float32+."""
        out = self.buf[: e - s]
        if self.w.dtype == out.dtype:
            return (
                torch.addmm(self.b, self.h[s:e], self.w.T, out=out)
                if self.b is not None
                else torch.mm(self.h[s:e], self.w.T, out=out)
            )
        return out.copy_(F.linear(self.h[s:e], self.w, self.b))

    def accumulate(self, G: Tensor, s: int, e: int) -> None:
        """∂h[s:e] = G·W, ∂W += Gᵀ·h[s:e], ∂b += Σ_rows G, with G (n, V) = ∂ℓ/∂logits."""
        Gc = G.to(self.w.dtype)
        if self.gh is not None:
            self.gh[s:e] = Gc @ self.w
        if self.gw is not None:
            hc = self.h[s:e]
            self.gw.addmm_(Gc.mT.to(self.gw.dtype), hc.to(self.gw.dtype))
        if self.gb is not None:
            self.gb.add_(Gc.sum(0, dtype=self.gb.dtype))

    def grads(self, weight: Tensor, bias: Tensor | None):
        """(∂h, ∂W, ∂b) in the parameters' dtypes; None where not needed."""
        return (
            self.gh,
            None if self.gw is None else self.gw.to(weight.dtype),
            None if self.gb is None else self.gb.to(bias.dtype),
        )


def _loss_pass(ch: _Chunker, with_grad: bool) -> _RowOut:
    """ℓ (N,) chunk by chunk; with_grad also builds each chunk's ∂ℓ/∂logits and accumulates
    ∂h, ∂W, ∂b for the weighted sum Σ_rows m·ℓ (the "stored" variant)."""
    spec, n = ch.spec, ch.h.shape[0]
    ell, lse, d_x, d_z = (torch.empty(n, dtype=spec.acc, device=ch.device) for _ in range(4))
    d_s = torch.empty_like(ell) if spec.targets.kernel.k > 0 else None
    fwd, grad = spec.ops()
    for s, e in ch.chunks(timed=with_grad):
        t = spec.targets.rows(s, e)
        res, inv_z = fwd(ch.logits(s, e), t, ch.spare[: e - s])
        ell[s:e], lse[s:e], d_x[s:e], d_z[s:e] = res.ell, res.lse, res.grads.d_x, res.grads.d_z
        if d_s is not None:
            d_s[s:e] = res.grads.d_s
        if with_grad:
            d = res.grads if spec.row_weight is None else res.grads.scaled(spec.row_weight[s:e])
            ch.accumulate(grad(ch.buf[: e - s], inv_z, t, d, ch.spare[: e - s]), s, e)
    return _RowOut(ell, lse, StatGrads(d_x, d_z, d_s))


def _recompute_grads(ch: _Chunker, out: _RowOut, grad_ell: Tensor):
    """∂h, ∂W, ∂b of Σ_rows grad_ell·ℓ, recomputing each chunk's logits from the saved lse."""
    d = out.grads.scaled(grad_ell)
    for s, e in ch.chunks(timed=ch.spec.variant == "recompute"):
        t = ch.spec.targets.rows(s, e)
        p = recompute_probs(ch.logits(s, e), t, out.lse[s:e])
        rows = StatGrads(*(None if v is None else v[s:e] for v in (d.d_x, d.d_z, d.d_s)))
        G = ch.spec.ops()[1](p, torch.ones_like(out.lse[s:e]), t, rows, ch.spare[: e - s])
        ch.accumulate(G, s, e)


class _FusedNelbo(torch.autograd.Function):
    """ℓ (N,) from h (N, D), W (V, D), b (V,) | None, chunked over the N rows.

    "stored": forward also computes the gradients of Σ m·ℓ (m the row weights, default 1);
    backward checks that the incoming gradient is c·m and returns c times them. Any other
    incoming gradient (or a second backward) falls back to the recompute path, so every
    backward is exact. "recompute": forward computes ℓ only; backward recomputes the logits.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, spec: _Spec, probe: ChunkProbe | None):
        need = ctx.needs_input_grad[:3]
        stored = spec.variant == "stored"
        with torch.autocast(h.device.type, enabled=False):
            ch = _Chunker(h, weight, bias, spec, probe, need if stored else (0, 0, 0))
            out = _loss_pass(ch, with_grad=stored)
        ctx.spec, ctx.probe, ctx.rows = spec, probe, _RowOut(None, out.lse, out.grads)
        ctx.stored = ch.grads(weight, bias) if stored else None
        ctx.save_for_backward(h, weight, bias)
        return out.ell

    @staticmethod
    def backward(ctx, grad_ell):
        h, weight, bias = ctx.saved_tensors
        scale = _uniform_scale(grad_ell, ctx.spec.row_weight) if ctx.stored else None
        if scale is not None:
            stored, ctx.stored = ctx.stored, None
            stored = (g if g is None or scale == 1.0 else g.mul_(scale) for g in stored)
            return (*stored, None, None)
        with torch.autocast(h.device.type, enabled=False):
            ch = _Chunker(h, weight, bias, ctx.spec, ctx.probe, ctx.needs_input_grad[:3])
            _recompute_grads(ch, ctx.rows, grad_ell.to(ctx.spec.acc))
        return (*ch.grads(weight, bias), None, None)


@functools.cache
def _compiled_ops():
    """`torch.compile` of the two per-chunk functions (dynamic in the rows), built on first use.

    Opt-in: measured on this CPU (docs/performance.md) the compile costs over a minute per
    process for a small gain per chunk; on CUDA it is not measured here.
    """
    return tuple(torch.compile(f, dynamic=True) for f in (forward_chunk, logit_grad))


def _uniform_scale(grad_ell: Tensor, row_weight: Tensor | None) -> float | None:
    """c if grad_ell == c·m (to a few ulps), else None; m = row weights (default all 1)."""
    m = torch.ones_like(grad_ell) if row_weight is None else row_weight.to(grad_ell.dtype)
    nonzero = (m != 0).nonzero()
    c = (grad_ell[nonzero[0, 0]] / m[nonzero[0, 0]]).item() if len(nonzero) else 0.0
    tol = 4 * torch.finfo(grad_ell.dtype).eps
    return c if torch.allclose(grad_ell, c * m, rtol=tol, atol=0.0) else None


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
    row_weight: Tensor | None = None,
    recompute: bool = False,
    compile_chunks: bool = False,
) -> Tensor:
    """ℓ_t(x0, z_t) (B, L) = `kernel.nelbo(hidden @ weight.T + bias, x0, z_t, alpha, dalpha)`.

    Args:
        hidden: h (B, L, D), the final hidden states (e.g. `DiT.hidden(...)`).
        weight: W (V, D), the output projection (`model.output_head.weight`).
        kernel: the MixedKernel (its V must equal weight.shape[0]).
        x0, z_t: LongTensor (B, L) clean and noisy ids.
        alpha, dalpha: α_t, α'_t (B,). No gradient flows to them (times are not learned).
        chunk_size: rows (tokens) per chunk; None = measured (`core/fused_plan.py`).
        bias: b (V,) or None.
        row_weight: m (B, L) (bool or float) that the caller will multiply ℓ by before summing,
            e.g. the loss mask; the forward pass computes the gradients of Σ m·ℓ. None = all 1.
        recompute: False (default) computes the gradients during forward and only scales them
            in backward; True computes ℓ only and recomputes each chunk's logits in backward
            (one more h·Wᵀ; holds no ∂h (N, D) and ∂W (V, D) between forward and backward).
        compile_chunks: run the per-chunk arithmetic through `torch.compile` (opt-in: see
            docs/performance.md for what it costs and gains).

    Gradients flow to hidden, weight and bias and are exact for any incoming gradient (one that
    is not c·m falls back to the recompute path). Autocast (e.g. bf16) applies to the chunk
    matmuls; the (n, V) arithmetic and ∂W, ∂b accumulate in float32.
    """
    B, L, D = _check(hidden, weight, x0, z_t, alpha, dalpha)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 or None (measured), got {chunk_size}")
    if row_weight is not None and row_weight.shape != (B, L):
        raise ValueError(f"row_weight must be (B, L)=({B}, {L}), got {tuple(row_weight.shape)}")
    kernel._check_vocab(weight.shape[0], "weight")
    dtype = _matmul_dtype(hidden, weight)
    acc = torch.promote_types(dtype, torch.float32)
    rows = (B * L,)
    targets = RowTargets(
        kernel,
        x0.reshape(rows),
        z_t.reshape(rows),
        alpha.detach().to(acc)[:, None].expand(B, L).reshape(rows),
        -dalpha.detach().to(acc)[:, None].expand(B, L).reshape(rows),
        kernel.has_small_lambda(alpha),  # once per call, not a host sync per chunk
    )
    variant = "recompute" if recompute else "stored"
    flat_m = None if row_weight is None else row_weight.reshape(rows)
    chunk = None if chunk_size is None else int(chunk_size)
    spec = _Spec(targets, flat_m, dtype, chunk, variant, compile_chunks)
    probe = None
    if chunk_size is None:
        key = variant + ("+compile" if compile_chunks else "")
        probe = probe_for(hidden.device, weight.shape[0], D, dtype, key, B * L)
    h = hidden.reshape(B * L, D)
    if not torch.is_grad_enabled() or not any(
        t.requires_grad for t in (h, weight, bias) if t is not None
    ):
        with torch.autocast(h.device.type, enabled=False):
            return _loss_pass(_Chunker(h, weight, bias, spec, probe), with_grad=False).ell.reshape(
                B, L
            )
    return _FusedNelbo.apply(h, weight, bias, spec, probe).reshape(B, L)


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on and the inputs are float32, else their type."""
    dev = hidden.device.type
    base = torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(dev) and base == torch.float32:
        return torch.get_autocast_dtype(dev)
    return base


def _check(hidden, weight, x0, z_t, alpha, dalpha) -> tuple[int, int, int]:
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
    return B, L, D


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
    recompute: bool = False,
    **corruption,
) -> LossOutput:
    """`diffusion_loss` for a `HiddenDenoiser`, with the loss fused into the output head.

    Same arguments (`corruption` = the keywords of `corrupt_batch`), same corruption path and
    same `LossOutput`; the model must expose `hidden(z_t, t, attention_mask, cond)` (B, L, D)
    and `output_head` (an nn.Linear with weight (V, D)). The counted-token mask is passed as
    `row_weight`, so the gradients of the reduced loss are computed in forward (`fused_nelbo`).
    """
    batch = corrupt_batch(kernel, schedule, x0, attention_mask=attention_mask, **corruption)
    counted = loss_mask if loss_mask is not None else attention_mask
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
        row_weight=counted,
        recompute=recompute,
    )
    return reduce_loss(per_token, batch, counted)
