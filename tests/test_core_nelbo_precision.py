"""float32 NELBO against independent high-precision references, down to α = 1e-5, and α = 1.

The references transcribe the formula of docs/math.md literally (differences of logs over a dense
V axis): in mpmath at 60 digits on a small case, and in float64 on a larger one (its own rounding,
≈ 1e-16·|log f|/α, stays below 1e-9 relative here). Bound asserted: summed relative error
Σ|ℓ32 − ℓref| / Σ|ℓref| ≤ 1e-6 (measured ≈ 2–4e-8 on AVX2 CPUs; before the log1p rewrite it was
1.8e-3 at α = 1e-4 and 0.35 at α = 1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch

from xdlm import MixedKernel
from xdlm.core.remainders import log1p_remainder

ALPHAS = [0.5, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
KS = [0.0, 0.1, 1.0]
BOUND = 1e-6


def _case(V: int, n: int, k: float, a: float, seed: int = 0):
    """float32 logits (1, n, V) with p_θ(m) = 0, x0, and z_t: a third z = x, the rest drawn from
    q(z_t | x) (so masked and uniform-noise states both occur)."""
    g = torch.Generator().manual_seed(seed)
    kern = MixedKernel(V, V - 1, k)
    logits = torch.randn(1, n, V, generator=g) * 3
    x0 = torch.randint(V - 1, (1, n), generator=g)
    z = kern.sample_marginal(x0, torch.tensor([a], dtype=torch.float64), g)
    z[:, : n // 3] = x0[:, : n // 3]
    return kern, logits, x0, z


def _reference_f64(kern: MixedKernel, logits, x0, z, a: float) -> torch.Tensor:
    """ℓ_t (−α' = 1) by the literal formula in float64 with dense (N, V) tensors."""
    V, k, m = kern.vocab_size, kern.k, kern.mask_id
    lg = logits.double().reshape(-1, V).clone()
    lg[:, m] = -math.inf
    p = lg.softmax(-1)
    x, zz = x0.reshape(-1), z.reshape(-1)
    r = kern.prior_probs(torch.float64)
    b = 1.0 - a
    onehot = torch.nn.functional.one_hot(x, V).double()
    f_x, f_p = a * onehot + b * r, a * p + b * r
    g = (f_x.log() - f_p.log())[:, [e for e in range(V) if e != m]]
    gbar = g.sum(-1) / V
    at = lambda t, i: t.gather(-1, i[:, None]).squeeze(-1)  # noqa: E731
    is_x = (zz == x).double()
    rho = r[zz] / at(f_x, zz)
    if k == 0.0:
        return torch.where(zz == m, -p.log().gather(-1, x[:, None]).squeeze(-1) / b, 0.0)
    inner = (is_x - at(p, zz)) / at(f_p, zz) - (at(f_x, zz).log() - at(f_p, zz).log()) / a
    inner = inner + (at(f_x, x).log() - at(f_p, x).log()) + k * b / a * gbar
    return rho * inner


def _reference_mp(kern: MixedKernel, logits, x0, z, a: float) -> list:
    """The same literal formula in mpmath at 60 significant digits."""
    import mpmath as mp

    mp.mp.dps = 60
    V, k, m = kern.vocab_size, kern.k, kern.mask_id
    A, B = mp.mpf(a), 1 - mp.mpf(a)
    r = [mp.mpf(k) / V + (1 - mp.mpf(k) if e == m else 0) for e in range(V)]
    out = []
    rows = zip(
        logits.reshape(-1, V).tolist(), x0.reshape(-1).tolist(), z.reshape(-1).tolist(), strict=True
    )
    for row, xi, zi in rows:
        ex = [mp.e ** mp.mpf(v) if e != m else mp.mpf(0) for e, v in enumerate(row)]
        p = [v / mp.fsum(ex) for v in ex]
        fx = [A * (e == xi) + B * r[e] for e in range(V)]
        fp = [A * p[e] + B * r[e] for e in range(V)]
        if k == 0.0:
            out.append(-mp.log(p[xi]) / B if zi == m else mp.mpf(0))
            continue
        gbar = mp.fsum(mp.log(fx[e]) - mp.log(fp[e]) for e in range(V) if e != m) / V
        inner = ((zi == xi) - p[zi]) / fp[zi] - (mp.log(fx[zi]) - mp.log(fp[zi])) / A
        inner += mp.log(fx[xi]) - mp.log(fp[xi]) + k * B / A * gbar
        out.append(r[zi] / fx[zi] * inner)
    return out


def _nelbo32(kern, logits, x0, z, a: float) -> torch.Tensor:
    alpha = torch.tensor([a], dtype=torch.float32)
    return kern.nelbo(logits, x0, z, alpha, -torch.ones(1))


def _summed_rel(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return float((approx.double().reshape(-1) - ref).abs().sum() / ref.abs().sum())


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("a", ALPHAS)
def test_float32_nelbo_matches_60_digit_reference(k, a):
    pytest.importorskip("mpmath")
    kern, logits, x0, z = _case(V=11, n=24, k=k, a=a)
    ref = torch.tensor(
        [float(v) for v in _reference_mp(kern, logits, x0, z, a)], dtype=torch.float64
    )
    assert ref.abs().sum() > 0
    assert _summed_rel(_nelbo32(kern, logits, x0, z, a), ref) < BOUND


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("a", ALPHAS)
@pytest.mark.parametrize("V", [64, 2000])
def test_float32_nelbo_matches_float64_reference(V, k, a):
    """Larger V: both ḡ paths (λ = V·α/(k·β) below and above 1) are exercised."""
    kern, logits, x0, z = _case(V=V, n=96, k=k, a=a, seed=V)
    ref = _reference_f64(kern, logits, x0, z, a)
    assert _summed_rel(_nelbo32(kern, logits, x0, z, a), ref) < BOUND


@pytest.mark.parametrize("k", KS)
def test_alpha_one_is_the_exact_limit_with_finite_gradients(k):
    """α = 1 (t = 0, reachable with t_min = 0): z = x and ℓ = (−α')·(k/V)·(1 − p_θ(x))/p_θ(x)."""
    V = 9
    kern = MixedKernel(V, V - 1, k)
    logits = torch.randn(2, 5, V, dtype=torch.float64, requires_grad=True)
    x0 = torch.randint(V - 1, (2, 5))
    ell = kern.nelbo(logits, x0, x0, torch.ones(2, dtype=torch.float64), -torch.ones(2).double())
    p_x = kern.log_probs(logits).exp().gather(-1, x0[..., None]).squeeze(-1)
    torch.testing.assert_close(ell, k / V * (1 - p_x) / p_x)
    ell.sum().backward()
    assert torch.isfinite(logits.grad).all()
    near = kern.nelbo(logits, x0, x0, torch.full((2,), 1 - 1e-9).double(), -torch.ones(2).double())
    torch.testing.assert_close(near, ell, rtol=1e-6, atol=1e-12)


def test_log1p_remainder_is_accurate_across_the_series_switch():
    u = torch.tensor([-0.9, -1e-2, -9.99e-3, -1e-6, 0.0, 1e-9, 9.99e-3, 1e-2, 0.5, 30.0])
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    ref = torch.tensor([float(v - mp.log1p(v)) for v in u.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1p_remainder(u.double()), ref, rtol=1e-13, atol=0.0)


def test_fused_loss_takes_the_same_small_alpha_path():
    """`fused_nelbo` decides the λ < 1 path once per call; its values and gradients equal
    `nelbo`'s at mixed small and large α."""
    from xdlm.core.fused import fused_nelbo

    g = torch.Generator().manual_seed(0)
    V, D = 64, 16
    kern = MixedKernel(V, V - 1, 0.1)
    h = torch.randn(3, 8, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    x0 = torch.randint(V - 1, (3, 8), generator=g)
    alpha = torch.tensor([1e-5, 1e-2, 0.5], dtype=torch.float64)
    assert kern.has_small_lambda(alpha) and not kern.has_small_lambda(alpha[1:])
    z = kern.sample_marginal(x0, alpha, g)
    dalpha = -torch.ones(3, dtype=torch.float64)
    ref = kern.nelbo(h @ w.T, x0, z, alpha, dalpha)
    (g_ref,) = torch.autograd.grad(ref.sum(), h)
    out = fused_nelbo(h, w, kern, x0, z, alpha, dalpha, chunk_size=5)
    (g_out,) = torch.autograd.grad(out.sum(), h)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g_out, g_ref)
