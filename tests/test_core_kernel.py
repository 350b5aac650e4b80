"""MixedKernel against brute-force Bayes with dense V×V matrices, special cases and oracles."""

import itertools
import math

import pytest
import torch

from xdlm import MixedKernel

D = torch.float64


def dense_Q(kern: MixedKernel, a: float) -> torch.Tensor:
    """Q[d, e] = a·[e = d] + (1 − a)·r(e): the V×V transition matrix with keep-probability a."""
    V = kern.vocab_size
    return a * torch.eye(V, dtype=D) + (1 - a) * kern.prior_probs(D).expand(V, V)


def brute_posterior(kern, p, z, at, as_):
    """p(z_s = e | z_t = z) ∝ Q_{t|s}(z | e)·f_{α_s}(p, e), built from dense matrices."""
    Qts = dense_Q(kern, at / as_)
    fs = p @ dense_Q(kern, as_)  # (N, V)
    num = fs * Qts[:, z].T  # (N, V): Q_{t|s}[e, z_n]
    return num / num.sum(-1, keepdim=True)


def brute_kl(kern, p, x, z, at, as_):
    q = brute_posterior(kern, torch.nn.functional.one_hot(x, kern.vocab_size).to(D), z, at, as_)
    pt = brute_posterior(kern, p, z, at, as_)
    terms = torch.where(q > 0, q * (q.log() - pt.log()), torch.zeros_like(q))
    return terms.sum(-1)


def random_case(kern, n, gen, data_ids=None):
    """Random p_θ (p(m) = 0), clean x (never m) and every possible z_t, flattened to N rows."""
    V, m = kern.vocab_size, kern.mask_id
    data = [i for i in range(V) if i != m] if data_ids is None else data_ids
    logits = torch.randn(n, V, generator=gen, dtype=D) * 2
    if m is not None:
        logits[:, m] = -math.inf
    p = logits.softmax(-1)
    x = torch.tensor(data)[torch.randint(len(data), (n,), generator=gen)]
    return logits, p, x


KERNELS = [(11, 10), (7, 0), (5, None)]


@pytest.mark.parametrize("V,m", KERNELS)
def test_posterior_equals_brute_force_bayes(V, m):
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(25):
        k = 1.0 if m is None else float(torch.rand((), generator=gen, dtype=D))
        kern = MixedKernel(V, m, k)
        at, as_ = sorted(torch.rand(2, generator=gen, dtype=D).tolist())
        as_ = 1.0 if _ % 5 == 0 else as_  # include the final noise-removal step
        _, p, _ = random_case(kern, V, gen)
        z = torch.arange(V)  # every z_t
        ours = kern.posterior_probs(
            p[None], z[None], torch.tensor([at], dtype=D), torch.tensor([as_], dtype=D)
        )[0]
        ref = brute_posterior(kern, p, z, at, as_)
        worst = max(worst, (ours - ref).abs().max().item())
        assert torch.allclose(ours.sum(-1), torch.ones(V, dtype=D), atol=1e-12)
        assert (ours >= -1e-15).all()
    assert worst < 1e-12, worst


def test_final_step_never_outputs_mask():
    kern = MixedKernel(9, 8, 0.3)
    gen = torch.Generator().manual_seed(0)
    _, p, _ = random_case(kern, 9, gen)
    out = kern.posterior_probs(
        p[None], torch.arange(9)[None], torch.tensor([0.2], dtype=D), torch.tensor([1.0], dtype=D)
    )
    assert out[..., 8].abs().max() == 0


@pytest.mark.parametrize("V,m", KERNELS)
def test_step_kl_equals_brute_force(V, m):
    gen = torch.Generator().manual_seed(2)
    worst = 0.0
    for i in range(30):
        k = 1.0 if m is None else [0.0, 1.0, float(torch.rand((), generator=gen))][i % 3]
        kern = MixedKernel(V, m, k)
        at, as_ = sorted((0.02 + 0.96 * torch.rand(2, generator=gen, dtype=D)).tolist())
        as_ = 1.0 if i % 7 == 0 else as_
        logits, p, x = random_case(kern, 64, gen)
        z = kern.sample_marginal(x[None], torch.tensor([at], dtype=D), generator=gen)[0]
        ours = kern.step_kl(
            logits[None],
            x[None],
            z[None],
            torch.tensor([at], dtype=D),
            torch.tensor([as_], dtype=D),
        )[0]
        ref = brute_kl(kern, p, x, z, at, as_)
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst < 1e-10, worst


@pytest.mark.parametrize("V,m,k", [(11, 10, 0.1), (11, 10, 0.7), (7, 0, 1.0), (5, None, 1.0)])
def test_nelbo_is_the_limit_of_step_kl(V, m, k):
    kern = MixedKernel(V, m, k)
    gen = torch.Generator().manual_seed(3)
    logits, _, x = random_case(kern, 200, gen)
    at = 0.05 + 0.9 * torch.rand(200, generator=gen, dtype=D)
    z = kern.sample_marginal(x[:, None], at, generator=gen)
    dalpha = -torch.full_like(at, 0.999)
    ours = kern.nelbo(logits[:, None], x[:, None], z, at, dalpha)
    h = 1e-7
    kl = kern.step_kl(logits[:, None], x[:, None], z, at, at + h)
    assert torch.allclose(ours, kl / h * 0.999, rtol=1e-5, atol=1e-8)


def test_nelbo_k0_is_mdlm_weighted_cross_entropy_and_nan_free():
    V, m = 6, 5
    kern = MixedKernel.mdlm(V, m)
    logits = torch.full((1, 4, V), -1e4, dtype=torch.float32)
    logits[..., 0] = 0.0  # p_θ(0) = 1, every other token underflows to 0
    x0 = torch.tensor([[1, 2, 0, 3]])
    z = torch.tensor([[m, 2, m, 3]])  # visible tokens with p_θ(z) = 0 exactly
    alpha, dalpha = torch.tensor([0.3]), torch.tensor([-0.999])
    out = kern.nelbo(logits, x0, z, alpha, dalpha)
    assert torch.isfinite(out).all()
    logp = kern.log_probs(logits)
    expect = 0.999 / 0.7 * -logp[0, 0, 1]
    assert out[0, 0] == pytest.approx(expect.item(), rel=1e-6)
    assert out[0, 1] == 0 and out[0, 3] == 0 and out[0, 2] == pytest.approx(0.0, abs=1e-6)


def udlm_reference(logits, x0, z, alpha, dalpha):
    """UDLM continuous-time NELBO (Schiff et al. 2024), written from its paper, per position.

    x̄ = V·α·x + (1 − α)·1, x̄_θ = V·α·p_θ + (1 − α)·1, i = z_t:
    ℓ = α'/(V·α)·[V/x̄_i − V/x̄_θ,i − Σ_{j≠i} (x̄_j/x̄_i)·log((x̄_θ,i·x̄_j)/(x̄_θ,j·x̄_i))]
    """
    V = logits.shape[-1]
    a = alpha[:, None, None]
    xbar = V * a * torch.nn.functional.one_hot(x0, V).to(D) + (1 - a)
    xth = V * a * logits.softmax(-1) + (1 - a)
    xi, xti = xbar.gather(-1, z[..., None]), xth.gather(-1, z[..., None])
    terms = xbar / xi * torch.log(xti * xbar / (xth * xi))
    terms = terms.scatter(-1, z[..., None], 0.0).sum(-1)
    inner = V / xi[..., 0] - V / xti[..., 0] - terms
    return dalpha[:, None] / (V * alpha[:, None]) * inner  # α' < 0 and the bracket is <= 0


def test_k1_without_mask_equals_udlm_nelbo():
    V = 7
    kern = MixedKernel.udlm(V)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 16, V, generator=gen, dtype=D)
    x0 = torch.randint(V, (8, 16), generator=gen)
    alpha = torch.rand(8, generator=gen, dtype=D) * 0.98 + 0.01
    z = kern.sample_marginal(x0, alpha, generator=gen)
    dalpha = -torch.ones(8, dtype=D)
    ours = kern.nelbo(logits, x0, z, alpha, dalpha)
    assert torch.allclose(ours, udlm_reference(logits, x0, z, alpha, dalpha), atol=1e-10)


@pytest.mark.parametrize("k", [0.0, 0.1, 0.5, 1.0])
def test_perfect_denoiser_has_zero_loss(k):
    kern = MixedKernel(10, 9, k)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randint(9, (4, 32), generator=gen)
    logits = torch.full((4, 32, 10), -math.inf, dtype=D).scatter(-1, x0[..., None], 0.0)
    alpha = torch.rand(4, generator=gen, dtype=D) * 0.9 + 0.05
    z = kern.sample_marginal(x0, alpha, generator=gen)
    out = kern.nelbo(logits, x0, z, alpha, -torch.ones(4, dtype=D))
    assert out.abs().max() < 1e-12
    kl = kern.step_kl(logits, x0, z, alpha, (alpha + 0.03).clamp_max(1.0))
    assert kl.abs().max() < 1e-12


def test_nelbo_nonnegative_and_inputs_untouched():
    kern = MixedKernel(12, 11, 0.1)
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 20, 12, generator=gen)
    x0 = torch.randint(11, (3, 20), generator=gen)
    alpha = torch.tensor([0.2, 0.5, 0.9])
    z = kern.sample_marginal(x0, alpha, generator=gen)
    copies = [v.clone() for v in (logits, x0, z, alpha)]
    out = kern.nelbo(logits, x0, z, alpha, -torch.ones(3))
    assert (out > -1e-6).all()
    for before, after in zip(copies, (logits, x0, z, alpha), strict=True):
        assert torch.equal(before, after)
    probs = torch.softmax(logits, -1)
    kern.posterior_probs(probs, z, alpha, alpha + 0.05)
    assert torch.equal(probs, torch.softmax(copies[0], -1))


def test_bf16_logits_are_upcast():
    """bf16 logits are computed with in float32: ℓ matches a float64 brute-force reference
    (the dense step KL's limit, (−α')·KL(α, α + h)/h) of the same bf16-rounded logits to float32
    accuracy, far tighter than bf16 arithmetic (relative error ~4e-3) could reach."""
    kern = MixedKernel(12, 11, 0.1)
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 5, 12, generator=gen)
    x0 = torch.randint(11, (2, 5), generator=gen)
    alpha = torch.tensor([0.3, 0.6])
    z = kern.sample_marginal(x0, alpha, generator=gen)
    out = kern.nelbo(logits.bfloat16(), x0, z, alpha, -torch.ones(2))
    assert out.dtype == torch.float32
    lg = logits.bfloat16().to(D)
    lg[..., 11] = -math.inf
    p, h = lg.softmax(-1).reshape(10, 12), 1e-7
    a = alpha.to(D).repeat_interleave(5)
    ref = torch.stack(
        [brute_kl(kern, p[i : i + 1], x0.reshape(-1)[i : i + 1], z.reshape(-1)[i : i + 1],
                  float(a[i]), float(a[i]) + h)[0] / h for i in range(10)]
    ).reshape(2, 5)  # fmt: skip
    torch.testing.assert_close(out.to(D), ref, rtol=2e-5, atol=1e-6)
    post = kern.posterior_probs(lg.softmax(-1).bfloat16(), z, alpha, alpha + 0.2)
    assert post.dtype == torch.float32


@pytest.mark.parametrize("k", [0.0, 0.3, 1.0])
def test_gradcheck_nelbo(k):
    kern = MixedKernel(5, 4, k)
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randint(4, (2, 3), generator=gen)
    alpha = torch.tensor([0.3, 0.7], dtype=D)
    z = kern.sample_marginal(x0, alpha, generator=gen)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=D, requires_grad=True)
    dalpha = -torch.ones(2, dtype=D)
    assert torch.autograd.gradcheck(lambda lg: kern.nelbo(lg, x0, z, alpha, dalpha), (logits,))


def test_marginal_probs_is_dense_marginal():
    kern = MixedKernel(6, 5, 0.4)
    p = torch.softmax(torch.randn(3, 6, dtype=D), -1)
    alpha = torch.tensor([0.1, 0.5, 0.95], dtype=D)
    ours = kern.marginal_probs(p, alpha)
    for i in range(3):
        assert torch.allclose(ours[i], p[i] @ dense_Q(kern, alpha[i].item()), atol=1e-14)


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square below the 99.9% quantile (Wilson–Hilferty approximation)."""
    n = counts.sum()
    keep = probs > 0
    exp = probs[keep] * n
    stat = ((counts[keep] - exp) ** 2 / exp).sum().item()
    df = int(keep.sum()) - 1
    if df == 0:  # a point mass: every draw must land on it
        return bool(counts[~keep].sum() == 0)
    q = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    return stat < q and counts[~keep].sum() == 0


@pytest.mark.parametrize("k,m", [(0.0, 6), (0.3, 6), (1.0, 6), (1.0, None)])
def test_sampling_frequencies_match_probabilities(k, m):
    V, n = 7, 200_000
    kern = MixedKernel(V, m, k)
    gen = torch.Generator().manual_seed(8)
    prior = kern.sample_prior((n,), generator=gen)
    assert _chi2_ok(torch.bincount(prior, minlength=V).to(D), kern.prior_probs(D))
    x0 = torch.full((1, n), 2)
    alpha = torch.tensor([0.35])
    z = kern.sample_marginal(x0, alpha, generator=gen)[0]
    probs = kern.marginal_probs(
        torch.nn.functional.one_hot(torch.tensor([2]), V).to(D), alpha.to(D)
    )[0]
    assert _chi2_ok(torch.bincount(z, minlength=V).to(D), probs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(vocab_size=5, mask_id=4, k=1.5), "k must be in"),
        (dict(vocab_size=5, mask_id=4, k=-0.1), "k must be in"),
        (dict(vocab_size=5, mask_id=None, k=0.5), "mask_id=None"),
        (dict(vocab_size=5, mask_id=5, k=0.1), "mask_id=5"),
    ],
)
def test_bad_kernel_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixedKernel(**kwargs)


def test_bad_call_arguments_name_the_value():
    kern = MixedKernel(5, 4, 0.1)
    p = torch.full((1, 2, 5), 0.25)
    z = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="alpha_s >= alpha_t"):
        kern.posterior_probs(p, z, torch.tensor([0.5]), torch.tensor([0.4]))
    with pytest.raises(ValueError, match="vocab_size=5"):
        kern.nelbo(torch.zeros(1, 2, 6), z, z, torch.tensor([0.5]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="shape"):
        kern.nelbo(torch.zeros(1, 3, 5), z, z, torch.tensor([0.5]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        kern.step_kl(torch.zeros(1, 2, 5), z, z, torch.tensor([0.5, 0.5]), torch.tensor([0.6, 0.6]))


# ---------------------------------------------------------------- enumerable toy: a true bound
# V <= 4, L = 2: every sequence state is enumerated; states are ordered row-major (z0, z1).


def _toy(kern, seed=9):
    """All S = V² states, the clean ones, and a fixed denoiser table (logits depend on all z_t)."""
    V = kern.vocab_size
    states = torch.tensor(list(itertools.product(range(V), repeat=2)))
    clean = states[(states != kern.mask_id).all(-1)] if kern.mask_id is not None else states
    table = torch.randn(len(states), 2, V, generator=torch.Generator().manual_seed(seed), dtype=D)
    return states, clean, table * 1.5


def _seq_marginal(kern, clean, alpha):
    """q(z_t = s | x) for every clean x (X,), every α (A,) and every state s: (A, X, S)."""
    V = kern.vocab_size
    onehot = torch.nn.functional.one_hot(clean, V).to(D)  # (X, 2, V)
    a = alpha.reshape(-1, 1, 1, 1)
    q1 = a * onehot + (1 - a) * kern.prior_probs(D)  # (A, X, 2, V)
    return (q1[..., 0, :, None] * q1[..., 1, None, :]).flatten(-2)


def _prior_kl(kern, clean):
    """KL(q(z_1 | x) ‖ r⊗r) with α_1 = 0: zero by construction, computed to check it."""
    q = _seq_marginal(kern, clean, torch.zeros(1, dtype=D))[0]
    r = kern.prior_probs(D)
    prior = (r[:, None] * r[None, :]).reshape(-1)
    logq = torch.where(q > 0, q.log(), torch.zeros_like(q))
    return torch.where(q > 0, q * (logq - prior.log()), 0.0).sum(-1)


def _bound_and_exact(kern, T):
    """T-step NELBO (linear α_t = 1 − t, grid ending at α = 1) and exact −log p(x) per clean x."""
    states, clean, table = _toy(kern)
    S, X = len(states), len(clean)
    probs = kern.log_probs(table).exp()
    alphas = 1.0 - torch.linspace(1.0, 0.0, T + 1, dtype=D)
    r = kern.prior_probs(D)
    dist = (r[:, None] * r[None, :]).reshape(-1)
    bound = _prior_kl(kern, clean)
    xs = clean.repeat_interleave(S, 0)  # (X·S, 2): every (x, z) pair
    zs, tab = states.repeat(X, 1), table.repeat(X, 1, 1)
    weights = _seq_marginal(kern, clean, alphas).reshape(T + 1, X * S)
    for i, (at, as_) in enumerate(zip(alphas[:-1], alphas[1:], strict=True)):
        post = kern.posterior_probs(probs, states, at.expand(S), as_.expand(S))
        dist = dist @ (post[:, 0, :, None] * post[:, 1, None, :]).reshape(S, S)
        kl = kern.step_kl(tab, xs, zs, at.expand(X * S), as_.expand(X * S)).sum(-1)
        w = weights[i]
        bound = bound + torch.where(w > 0, w * kl, 0.0).reshape(X, S).sum(-1)
    exact = -dist.reshape(kern.vocab_size, -1)[clean[:, 0], clean[:, 1]].log()
    return bound, exact


@pytest.mark.parametrize("V,m,k", [(4, 3, 0.0), (4, 3, 0.3), (4, 3, 1.0), (3, None, 1.0)])
def test_discrete_bound_is_a_valid_upper_bound(V, m, k):
    kern = MixedKernel(V, m, k)
    for T in (1, 4, 32):
        bound, exact = _bound_and_exact(kern, T)
        assert torch.isfinite(bound).all()
        assert (bound >= exact - 1e-9).all(), (T, bound - exact)


def _continuous(kern, n_t=2000):
    """Prior KL + ∫_0^1 E_{q(z_t|x)} Σ_positions ℓ_t dt (midpoint rule) for every clean x."""
    states, clean, table = _toy(kern)
    S = len(states)
    t = (torch.arange(n_t, dtype=D) + 0.5) / n_t
    alpha = (1.0 - t).repeat_interleave(S)
    total = []
    for x in clean:  # ℓ depends on x: recompute with the right clean sequence
        ell = kern.nelbo(
            table.repeat(n_t, 1, 1),
            x.expand(S * n_t, 2),
            states.repeat(n_t, 1),
            alpha,
            -torch.ones_like(alpha),
        ).sum(-1)
        w = _seq_marginal(kern, x[None], 1.0 - t)[:, 0].reshape(-1)
        total.append(torch.where(w > 0, w * ell, 0.0).sum() / n_t)
    return _prior_kl(kern, clean) + torch.stack(total)


@pytest.mark.parametrize("V,m,k", [(4, 3, 0.0), (4, 3, 0.3), (3, None, 1.0)])
def test_discrete_bound_converges_to_continuous(V, m, k):
    kern = MixedKernel(V, m, k)
    cont = _continuous(kern)
    errs = [(_bound_and_exact(kern, T)[0] - cont).abs().max().item() for T in (8, 64, 512)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.01 * cont.abs().max().item(), (errs, cont)
