"""BASELINE ONLY: a naive dense XDLM NELBO, written the way the UDLM/GIDD reference code does.

It materialises one-hots of x0 and z_t, the dense marginals f_α(x, ·) and f_α(p_θ, ·), their
logs and the dense log-ratio g(e) = log f_α(x, e) − log f_α(p_θ, e), all (N, V), and gathers by
multiplying with one-hots. Same value as `MixedKernel.nelbo` (checked in the benchmark run);
it exists to show what the closed-form O(V) kernel and the fused loss save. Not for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xdlm.core.kernel import MixedKernel


def naive_nelbo(
    kernel: MixedKernel, logits: Tensor, x0: Tensor, z_t: Tensor, alpha: Tensor, dalpha: Tensor
) -> Tensor:
    """ℓ (N,) from logits (N, V), x0, z_t (N,), α, α' (N,) with dense (N, V) intermediates (k > 0).

    ℓ = (−α')·ρ(z)·{ ([z = x] − p_θ(z))/f_α(p_θ, z) − g(z)/α + g(x) + (k·β/α)·(1/V)·Σ_e g(e) }
    """
    V, k = kernel.vocab_size, kernel.k
    r = kernel.prior_probs(logits.dtype)
    if kernel.mask_id is not None:
        logits = logits.index_fill(-1, torch.tensor([kernel.mask_id]), float("-inf"))
    p = torch.softmax(logits, -1)
    a, w = alpha[:, None], -dalpha
    hot_x = F.one_hot(x0, V).to(p.dtype)
    hot_z = F.one_hot(z_t, V).to(p.dtype)
    f_x = a * hot_x + (1 - a) * r
    f_p = a * p + (1 - a) * r
    g = torch.log(f_x) - torch.log(f_p)
    rho = (r * hot_z).sum(-1) / (f_x * hot_z).sum(-1)
    t1 = ((hot_x * hot_z).sum(-1) - (p * hot_z).sum(-1)) / (f_p * hot_z).sum(-1)
    a = a.squeeze(-1)
    inner = t1 - (g * hot_z).sum(-1) / a + (g * hot_x).sum(-1) + k * (1 - a) / a * g.sum(-1) / V
    return w * rho * inner
