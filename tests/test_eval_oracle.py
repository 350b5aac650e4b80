"""xdlm.eval.oracle: the ideal denoiser by brute force, exact per-position reverse steps, the exact
output law against `generate` (chi-square) and its T → ∞ limit for every k."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chi2

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import LogLinear
from xdlm.eval.oracle import (
    EnumerableData,
    OracleDenoiser,
    all_sequences,
    divergences,
    exact_output_law,
)
from xdlm.sampling import generate

SCHED = LogLinear()
D, L = 3, 3


def _data(d: int = D, length: int = L, seed: int = 0) -> EnumerableData:
    g = torch.Generator().manual_seed(seed)
    transition = torch.rand(d, d, generator=g, dtype=torch.float64) ** 3 + 0.02
    initial = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    return EnumerableData.markov(
        initial / initial.sum(), transition / transition.sum(1, keepdim=True), length
    )


def _kernel(k: float, d: int = D) -> MixedKernel:
    return MixedKernel(d, None, 1.0) if k == 1.0 else MixedKernel(d + 1, d, k)


def _q(kern: MixedKernel, z: int, x: int, alpha: float) -> float:
    return alpha * (z == x) + (1 - alpha) * float(kern.prior_probs(torch.float64)[z])


def test_all_sequences_and_validation():
    seqs = all_sequences(3, 2)
    assert seqs.tolist() == [list(p) for p in itertools.product(range(3), repeat=2)]
    data = _data()
    assert data.num_tokens == D and float(data.probs.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="all_sequences"):
        EnumerableData(data.sequences.flip(0), data.probs)
    with pytest.raises(ValueError, match="distribution"):
        EnumerableData(data.sequences, data.probs * 2)
    with pytest.raises(ValueError, match="data ids are 0..1"):
        OracleDenoiser(data, MixedKernel(3, 2, 0.1), SCHED)


@pytest.mark.parametrize("k", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("leave_one_out", [True, False])
def test_oracle_equals_brute_force_bayes(k, leave_one_out):
    data, kern = _data(), _kernel(k)
    oracle = OracleDenoiser(data, kern, SCHED, leave_one_out)
    g = torch.Generator().manual_seed(3)
    z = torch.randint(kern.vocab_size, (6, L), generator=g)
    alpha = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    got = oracle.probs(z, alpha)
    for b in range(z.shape[0]):
        for pos in range(L):
            want = torch.zeros(kern.vocab_size, dtype=torch.float64)
            for x, p in zip(data.sequences.tolist(), data.probs.tolist(), strict=True):
                others = [j for j in range(L) if j != pos or not leave_one_out]
                w = p
                for j in others:
                    w *= _q(kern, int(z[b, j]), x[j], float(alpha[b]))
                want[x[pos]] += w
            torch.testing.assert_close(got[b, pos], want / want.sum(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [0.0, 0.1, 0.6, 1.0])
def test_leave_one_out_makes_the_plug_in_posterior_exact(k):
    """Q(z_t|e)·f_s(p*, e)/f_t(p*, z_t) = Σ_x p(x^l | z_t)·q(z_s^l = e | z_t^l, x^l) at every
    position, for one big step, with p* the leave-one-out oracle and p(x^l | z_t) the other."""
    data, kern = _data(), _kernel(k)
    g = torch.Generator().manual_seed(5)
    z = torch.randint(kern.vocab_size, (8, L), generator=g)
    a_t = torch.full((8,), 0.2, dtype=torch.float64)
    a_s = torch.full((8,), 0.75, dtype=torch.float64)
    star = OracleDenoiser(data, kern, SCHED).probs(z, a_t)
    plug_in = kern.posterior_probs(star, z, a_t, a_s)
    mean = OracleDenoiser(data, kern, SCHED, leave_one_out=False).probs(z, a_t)  # p(x^l | z_t)
    exact = torch.zeros_like(plug_in)
    for x in range(D):
        onehot = torch.nn.functional.one_hot(torch.full_like(z, x), kern.vocab_size).double()
        exact += mean[..., x : x + 1] * kern.posterior_probs(onehot, z, a_t, a_s)
    torch.testing.assert_close(plug_in, exact, atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [0.0, 0.5, 1.0])
def test_exact_law_matches_generate_chi_square(k):
    data, kern = _data(2, 3, seed=1), _kernel(k, 2)
    oracle = OracleDenoiser(data, kern, SCHED)
    law = exact_output_law(oracle, steps=3)
    n = 20_000
    out = generate(
        oracle,
        kern,
        SCHED,
        batch_size=n,
        seq_len=3,
        steps=3,
        generator=torch.Generator().manual_seed(7),
        cache=False,
    )
    assert int(out.tokens.max()) < 2  # no mask left
    index = (out.tokens * torch.tensor([4, 2, 1])).sum(-1)
    counts = torch.bincount(index, minlength=8).double()
    stat = float(((counts - n * law) ** 2 / (n * law)).sum())
    assert stat < chi2.ppf(1 - 1e-4, 7), (stat, counts, n * law)


@pytest.mark.parametrize("k", [0.0, 0.1, 0.5, 1.0])
def test_error_vanishes_with_steps_only_for_the_leave_one_out_oracle(k):
    data, kern = _data(2, 3), _kernel(k, 2)
    tv = [
        divergences(data.probs, exact_output_law(OracleDenoiser(data, kern, SCHED), t))["tv"]
        for t in (1, 8, 128)
    ]
    assert tv[0] > tv[1] > tv[2] and tv[2] < 0.01, tv
    naive = OracleDenoiser(data, kern, SCHED, leave_one_out=False)
    naive_tv = divergences(data.probs, exact_output_law(naive, 128))["tv"]
    if k == 0.0:  # the same denoiser: mask evidence does not depend on x
        assert naive_tv == pytest.approx(tv[2], abs=1e-12)
    else:
        assert naive_tv > 5 * tv[2], (naive_tv, tv[2])


def test_divergences():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert divergences(p, p) == {"tv": 0.0, "kl_nats": 0.0}
    d = divergences(p, torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert d["tv"] == pytest.approx(0.25)
    assert d["kl_nats"] == pytest.approx(
        0.5 * (torch.tensor(2 / 3).log() + torch.tensor(2.0).log())
    )


def _expected_step_kl(data, kern, probs_of, a_t: float, a_s: float) -> float:
    """E_{x ~ p, z_t ~ q(·|x)} Σ_l KL(q(z_s^l | z_t^l, x^l) ‖ p_θ(z_s^l | z_t)), by enumeration."""
    states = all_sequences(kern.vocab_size, data.sequences.shape[1])
    s, n = states.shape[0], data.sequences.shape[0]
    z = states.repeat_interleave(n, 0)
    x = data.sequences.repeat(s, 1)
    q = kern.marginal_probs(torch.eye(D, kern.vocab_size, dtype=torch.float64), torch.tensor([a_t]))
    weight = data.probs.repeat(s) * q[x, z].prod(-1)
    alpha = torch.full((s,), a_t, dtype=torch.float64)
    logits = probs_of(states, alpha).clamp_min(1e-300).log().repeat_interleave(n, 0)
    kl = kern.step_kl(logits, x, z, torch.full((s * n,), a_t), torch.full((s * n,), a_s))
    return float((weight * kl.sum(-1).double()).sum())


@pytest.mark.parametrize("k", [0.1, 0.6, 1.0])
def test_leave_one_out_oracle_minimises_the_expected_step_kl(k):
    """The NELBO's per-step term is smallest at p(x^l | z_t^{−l}): lower than at the posterior
    mean and than at random perturbations of it (math §6.4)."""
    data, kern = _data(), _kernel(k)
    star = OracleDenoiser(data, kern, SCHED)
    mean = OracleDenoiser(data, kern, SCHED, leave_one_out=False)
    best = _expected_step_kl(data, kern, star.probs, 0.3, 0.6)
    assert best < _expected_step_kl(data, kern, mean.probs, 0.3, 0.6) - 1e-4
    g = torch.Generator().manual_seed(0)
    for _ in range(3):

        def perturbed(z, alpha):
            p = star.probs(z, alpha)
            noise = torch.exp(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            p = p * noise * (p > 0)
            return p / p.sum(-1, keepdim=True)

        assert best < _expected_step_kl(data, kern, perturbed, 0.3, 0.6)
