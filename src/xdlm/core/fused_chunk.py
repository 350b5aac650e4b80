"""The per-chunk arithmetic of the fused loss: row statistics, ℓ, and ∂ℓ/∂logits in closed form.

ℓ_t(x, z) depends on a row of logits only through three numbers (`MixedKernel.nelbo_from_stats`
takes V·ḡ = softplus(c) − S):

    lp_x = log p_θ(x),   lp_z = log p_θ(z),   S = Σ_e softplus(log p_θ(e) + c),   c = log(Vα/(kβ))

so, with the per-row derivatives d_x = ∂ℓ/∂lp_x, d_z = ∂ℓ/∂lp_z, d_S = ∂ℓ/∂S (docs/math.md §7.1),

    ∂ℓ/∂logits = G − p_θ·Σ_e G(e),   G = d_S·σ(log p_θ + c) + d_x·δ_x + d_z·δ_z,

with the mask column's gradient 0 (its logit is forced to −inf). With C = e^c and p_θ = e/Z
(e = exp(logits − max), Z = Σ e), softplus(log p_θ + c) = log1p(p_θ·C) and
σ(log p_θ + c) = 1 − 1/(1 + p_θ·C): one exp per logit, the rest is arithmetic.

Everything here works in place on one (n, V) chunk buffer plus one more of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from xdlm.core.kernel import MixedKernel, _Gterms
from xdlm.core.remainders import mixed_gbar_small


@dataclass(frozen=True)
class RowTargets:
    """What each of N rows is scored against: x0, z_t (N,) ids; α_t and w = −α'_t (N,).

    `small_lambda` False promises that no row has λ < 1, which skips a host sync per chunk.
    """

    kernel: MixedKernel
    x0: Tensor
    z_t: Tensor
    alpha: Tensor
    w: Tensor
    small_lambda: bool = True  # some row may have λ < 1 (`has_small_lambda`, decided once)

    def rows(self, s: int, e: int) -> RowTargets:
        rows = (t[s:e] for t in (self.x0, self.z_t, self.alpha, self.w))
        return RowTargets(self.kernel, *rows, self.small_lambda)

    def log_c(self) -> Tensor | None:
        """c = log(V·α/(k·β)) (N,) float64, the softplus offset of ḡ; None when k = 0."""
        return self.kernel.gbar_offset(self.alpha.double()) if self.kernel.k > 0 else None


@dataclass(frozen=True)
class StatGrads:
    """Per-row derivatives of ℓ: d_x = ∂ℓ/∂lp_x, d_z = ∂ℓ/∂lp_z, d_s = ∂ℓ/∂S (None if k = 0)."""

    d_x: Tensor
    d_z: Tensor
    d_s: Tensor | None

    def scaled(self, s: Tensor) -> StatGrads:
        """The derivatives of s·ℓ for a row weight s (N,); rows with s = 0 give exactly 0."""

        def mul(d: Tensor) -> Tensor:
            return torch.where(s != 0, d * s.to(d.dtype), torch.zeros_like(d))

        return StatGrads(mul(self.d_x), mul(self.d_z), None if self.d_s is None else mul(self.d_s))


@dataclass(frozen=True)
class ChunkResult:
    """ℓ (n,), its statistic derivatives, and lse = log Σ_e exp(logits) (n,) for a recompute."""

    ell: Tensor
    grads: StatGrads
    lse: Tensor


def stat_grads(t: RowTargets, lp_x: Tensor, lp_z: Tensor) -> StatGrads:
    """Closed-form ∂ℓ/∂(lp_x, lp_z, S) (docs/math.md §7.1), in float64. All (n,).

    k = 0: ℓ = w/β·(−lp_x) at masked z, so d_x = −w/β there and 0 elsewhere.
    k > 0, with ρ = ρ_t(z), t1 = ([z = x] − p_θ(z))/f_α(p_θ, z):
        d_x = −wρ·α·p_θ(x)/f_α(p_θ, x),   d_z = −wρ·t1·α·p_θ(z)/f_α(p_θ, z),   d_S = −wρ·kβ/(αV).
    """
    kern, a, w = t.kernel, t.alpha.double(), t.w.double()
    lp_x, lp_z = lp_x.double(), lp_z.double()
    if kern.k == 0.0:
        b = 1.0 - a
        d_x = -w / torch.where(b > 0, b, torch.ones_like(b))  # α = 1: nothing is masked
        d_x = torch.where(kern._is_mask(t.z_t), d_x, torch.zeros_like(d_x))
        return StatGrads(d_x, torch.zeros_like(lp_z), None)
    g = _Gterms(kern, None, lp_x, lp_z, t.x0, t.z_t, a)
    wr, log_a = w * g.rho, torch.log(a)
    t1 = (g.is_x.to(lp_x) - lp_z.exp()) * torch.exp(-g.log_fp_z)
    d_x = -wr * torch.exp(log_a + lp_x - g.log_fp_x)
    d_z = -wr * t1 * torch.exp(log_a + lp_z - g.log_fp_z)
    d_s = -wr * kern.k * (1.0 - a) / (a * kern.vocab_size)
    return StatGrads(d_x, d_z, d_s)


def _mask_logit(buf: Tensor, mask_id: int | None) -> None:
    if mask_id is not None:
        buf[:, mask_id] = float("-inf")


def forward_chunk(buf: Tensor, t: RowTargets, spare: Tensor) -> tuple[ChunkResult, Tensor]:
    """ℓ and its statistic derivatives from the logits in `buf` (n, V), float32+.

    Overwrites `buf` with e = exp(logits − max) and uses `spare` (n, V) as scratch. Returns the
    result and 1/Z (n,), so that p_θ = e/Z is available to `logit_grad` without another pass.
    V·ḡ is softplus(c) − S, or `mixed_gbar_small` on the rare rows with λ = e^c < 1 (as in
    `MixedKernel._v_gbar`), taken from the logits before they are overwritten.
    """
    _mask_logit(buf, t.kernel.mask_id)
    log_c = t.log_c()
    small = None
    if log_c is not None and t.small_lambda:
        small = (log_c < 0).nonzero(as_tuple=True)[0]
    v_small = None
    if small is not None and small.numel():
        logp = torch.log_softmax(buf[small], -1, dtype=torch.float64)
        v_small = mixed_gbar_small(logp, log_c[small].exp())
    lg_x = buf.gather(1, t.x0[:, None]).squeeze(1)
    lg_z = buf.gather(1, t.z_t[:, None]).squeeze(1)
    mx = buf.amax(1, keepdim=True)
    buf.sub_(mx).exp_()
    lse = mx.squeeze(1) + buf.sum(1).log()
    lp_x, lp_z = lg_x - lse, lg_z - lse
    inv_z = torch.exp(mx.squeeze(1) - lse)
    v_gbar = None
    if log_c is not None:  # S = Σ log1p(p_θ·C), p_θ·C = e·(C/Z)
        torch.mul(buf, _scale(log_c, inv_z, buf.dtype), out=spare)
        v_gbar = torch.nn.functional.softplus(log_c) - spare.log1p_().sum(1).double()
        if v_small is not None:
            v_gbar = v_gbar.index_put((small,), v_small)
    ell = t.kernel.nelbo_from_stats(lp_x, lp_z, v_gbar, t.x0, t.z_t, t.alpha.double(), t.w.double())
    return ChunkResult(ell.to(buf.dtype), stat_grads(t, lp_x, lp_z), lse), inv_z


def _scale(log_c: Tensor, inv_z: Tensor, dtype: torch.dtype) -> Tensor:
    """C/Z (n, 1) in the buffer's dtype: p_θ·C = e·(C/Z)."""
    return torch.exp(log_c + torch.log(inv_z.double())).to(dtype)[:, None]


def logit_grad(e: Tensor, inv_z: Tensor, t: RowTargets, d: StatGrads, out: Tensor) -> Tensor:
    """∂ℓ/∂logits (n, V) into `out`, from e = Z·p_θ (n, V), 1/Z (n,) and the derivatives d.

    G = d_S·σ(log p_θ + c) + d_x·δ_x + d_z·δ_z − p_θ·Σ_e G(e); mask column 0. `out` may not
    alias `e`.
    """
    dt = out.dtype
    if d.d_s is not None:  # d_S·σ = d_S − d_S/(1 + p_θ·C)
        d_s = d.d_s.to(dt)[:, None]
        torch.mul(e, _scale(t.log_c(), inv_z, dt), out=out)
        out.add_(1.0).reciprocal_().mul_(-d_s).add_(d_s)
        total = out.sum(1)
    else:
        out.zero_()
        total = torch.zeros_like(inv_z, dtype=dt)
    total = total + d.d_x.to(dt) + d.d_z.to(dt)
    out.addcmul_(e, (-total * inv_z.to(dt))[:, None])
    out.scatter_add_(1, t.x0[:, None], d.d_x[:, None].to(dt))
    out.scatter_add_(1, t.z_t[:, None], d.d_z[:, None].to(dt))
    if t.kernel.mask_id is not None:
        out[:, t.kernel.mask_id] = 0.0
    return out


def recompute_probs(buf: Tensor, t: RowTargets, lse: Tensor) -> Tensor:
    """p_θ = exp(logits − lse) in place in `buf` (n, V), from the lse saved by `forward_chunk`."""
    _mask_logit(buf, t.kernel.mask_id)
    return buf.sub_(lse[:, None]).exp_()
