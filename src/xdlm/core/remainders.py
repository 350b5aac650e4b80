"""ψ(u) = u − log1p(u): the remainder the NELBO's small-α terms are made of, without cancellation.

At small α every log-ratio of the NELBO is log1p of something O(α) and the formula subtracts
its first-order part again, e.g. ([z = x] − p_θ(z))/f_α(p_θ, z) − (1/α)·log(f_α(x, z)/f_α(p_θ, z))
= ψ(u)/α with u = α·([z = x] − p_θ(z))/f_α(p_θ, z). Written as a difference of logs this loses
all float32 digits once α ≲ 1e-4 (error ≈ 2.4e-7/α nats); written with ψ it is exact in exact
arithmetic and keeps full relative accuracy (docs/math.md, "float32 at small α").
"""

from __future__ import annotations

import torch
from torch import Tensor

SERIES_BELOW = 1e-2  # |u| below this: the Taylor series (truncation ~u^7/9, < 1e-14 relative)


def log1p_remainder(u: Tensor) -> Tensor:
    """ψ(u) = u − log1p(u) ≥ 0 for u > −1, elementwise in float64, relative error ~1e-14.

    |u| < 1e-2: ψ = u²·(1/2 − u/3 + u²/4 − … + u⁶/8); otherwise the direct difference, whose
    float64 rounding (≈ 2e-16·u/ψ(u) ≤ 4e-14) is then harmless. Differentiable.
    """
    u = u.to(torch.float64)
    small = u.abs() < SERIES_BELOW
    s = torch.where(small, u, torch.zeros_like(u))
    series = (
        s
        * s
        * (1 / 2 - s * (1 / 3 - s * (1 / 4 - s * (1 / 5 - s * (1 / 6 - s * (1 / 7 - s / 8))))))
    )
    d = torch.where(small, torch.full_like(u, 0.5), u)  # keeps the unused branch finite
    return torch.where(small, series, d - torch.log1p(d))


def mixed_gbar_small(logp: Tensor, lam: Tensor) -> Tensor:
    """V·ḡ_α = Σ_{e≠m} ψ(λ·p_θ(e)) − ψ(λ) for rows with λ = V·α/(k·β) < 1, float64.

    logp: log p_θ (N, V) (mask column −inf), lam: λ (N,) -> (N,). Exact rewrite of
    log1p(λ) − Σ_e log1p(λ·p_θ(e)) using Σ_e p_θ(e) = 1; both sides are O(λ²) while each log
    is O(λ), so the log form keeps only ≈ eps/λ of relative accuracy.
    """
    lam = lam.to(torch.float64)
    terms = log1p_remainder(lam[:, None] * logp.to(torch.float64).exp())
    return terms.sum(-1) - log1p_remainder(lam)
