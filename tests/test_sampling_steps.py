"""Step functions, grids, conditioning helpers and trajectory classification (unit level)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Cosine, LogLinear
from xdlm.sampling import (
    Ancestral,
    AncestralFinal,
    Confidence,
    Fixed,
    GreedyFinal,
    LogitFilter,
    ReMDM,
    StepTimes,
    Trajectory,
    UniformAlpha,
    UniformT,
    block_windows,
    edit_budget,
    fixed_from_template,
    parse_infill,
)
from xdlm.sampling.steps import sample_posterior

V, M = 7, 6


def _probs(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n, V, generator=g)
    logits[..., M] = float("-inf")
    return logits.softmax(-1)


def _times(b: int, at: float, as_: float, left: int = 4) -> StepTimes:
    return StepTimes(torch.full((b,), at), torch.full((b,), as_), left)


def test_remdm_eta0_equals_mdlm_posterior_and_rows_sum_to_one():
    kern = MixedKernel.mdlm(V, M)
    z = torch.tensor([[M, 0, M, 3, M]])
    p = _probs(1, 5)
    fixed = Fixed.none(z)
    for eta, rescale in ((0.0, False), (0.3, False), (0.5, True)):
        out = ReMDM(eta=eta, rescale=rescale).step(kern, p, z, _times(1, 0.3, 0.6), None, fixed)
        torch.testing.assert_close(out.probs.sum(-1), torch.ones(1, 5))
        assert bool((out.probs >= 0).all())
    ref = kern.posterior_probs(p, z, torch.tensor([0.3]), torch.tensor([0.6]))
    got = ReMDM(eta=0.0).step(kern, p, z, _times(1, 0.3, 0.6), None, fixed).probs
    torch.testing.assert_close(got, ref)


def test_remdm_sigma_cap_and_rescale():
    at, as_ = torch.tensor([0.5]), torch.tensor([0.8])  # σ_max = 0.2 / 0.5 = 0.4
    torch.testing.assert_close(ReMDM(eta=0.1).sigma(at, as_), torch.tensor([0.1]))
    torch.testing.assert_close(ReMDM(eta=0.9).sigma(at, as_), torch.tensor([0.4]))
    torch.testing.assert_close(ReMDM(0.5, rescale=True).sigma(at, as_), torch.tensor([0.2]))
    far = torch.tensor([0.2]), torch.tensor([0.6])  # (1 − α_s)/α_t = 2: σ_max = 1
    torch.testing.assert_close(ReMDM(0.5, rescale=True).sigma(*far), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="k=0"):
        ReMDM().step(
            MixedKernel(V, M, 0.1),
            _probs(1, 2),
            torch.tensor([[M, 1]]),
            _times(1, 0.3, 0.6),
            None,
            Fixed.none(torch.tensor([[M, 1]])),
        )


def test_final_greedy_is_argmax_at_masks_and_keeps_visible_at_k0():
    kern = MixedKernel.mdlm(V, M)
    z = torch.tensor([[M, 2, M, 4]])
    p = _probs(1, 4, seed=3)
    out = GreedyFinal().step(kern, p, z, torch.tensor([0.9]), None, Fixed.none(z))
    expect = torch.where(z == M, p.argmax(-1), z)
    assert torch.equal(out.z_s, expect)
    anc = AncestralFinal().step(kern, p, z, torch.tensor([0.9]), torch.Generator(), Fixed.none(z))
    assert bool((anc.z_s != M).all()) and torch.equal(anc.z_s[z != M], z[z != M])


def test_ancestral_step_pins_fixed_positions():
    kern = MixedKernel(V, M, 0.5)
    z = torch.full((64, 5), M)
    fixed = Fixed(
        torch.tensor([True, False, True, False, False]).expand(64, 5), torch.full((64, 5), 2)
    )
    out = Ancestral().step(
        kern, _probs(64, 5), fixed.pin(z), _times(64, 0.2, 0.9), torch.Generator(), fixed
    )
    assert bool((out.z_s[:, [0, 2]] == 2).all())


def test_confidence_reveals_ceil_and_respects_edit_budget():
    kern = MixedKernel(V, M, 0.5)  # budget = N
    z = torch.tensor([[M, M, M, M, M, 0, 0, 0, 0, 0]])
    p = torch.zeros(1, 10, V)
    p[..., 1] = torch.linspace(0.9, 0.5, 10)  # argmax 1 everywhere, differs from visible 0
    p[..., 0] = 1 - p[..., 1]
    out = Confidence().step(kern, p, z, _times(1, 0.2, 0.5, left=3), None, Fixed.none(z))
    changed = out.z_s != z
    assert int(changed[0, :5].sum()) == 2  # ⌈5 / 3⌉ revealed: the two most confident
    assert changed[0, :2].all() and int(changed[0, 5:].sum()) == 2  # edits: budget ⌊1·2⌋
    assert changed[0, 5:7].all()  # largest margins p(1) − p(0) first


def test_edit_budget_values():
    n = torch.tensor([0, 1, 8, 9, 10])
    assert edit_budget(0.0, n).tolist() == [0, 0, 0, 0, 0]
    assert edit_budget(0.1, n).tolist() == [0, 0, 0, 1, 1]
    assert edit_budget(0.5, n).tolist() == [0, 1, 8, 9, 10]
    with pytest.raises(ValueError):
        edit_budget(1.0, n)


def test_time_grids():
    ts = UniformT().times(LogLinear(), 4)
    torch.testing.assert_close(ts, torch.linspace(1, 1e-5, 5, dtype=torch.float64))
    torch.testing.assert_close(UniformAlpha().times(LogLinear(), 4), ts)  # α linear in t
    a = Cosine().alpha(UniformAlpha().times(Cosine(), 5))
    torch.testing.assert_close(a.diff(), a.diff()[:1].expand(5), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="t_end"):
        UniformT(t_end=1.0).times(LogLinear(), 4)
    with pytest.raises(ValueError, match="steps"):
        UniformAlpha().times(LogLinear(), 0)


def test_templates_infill_and_windows():
    fx = fixed_from_template([5, None, 7], 2, 5)
    assert fx.mask.tolist() == [[True, False, True, False, False]] * 2
    assert fx.tokens[0, 2] == 7
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    assert parse_infill("ab[BLANK]c[BLANK:1]", enc, 2) == [97, 98, None, None, 99, None]
    with pytest.raises(ValueError, match="BLANK"):
        parse_infill("no marker", enc, 2)
    with pytest.raises(ValueError, match="seq_len"):
        fixed_from_template([1] * 6, 1, 5)
    wins = [(w.start, w.begin, w.end) for w in block_windows(20, 8, 12)]
    assert wins == [(0, 0, 8), (4, 8, 16), (8, 16, 20)]
    with pytest.raises(ValueError, match="block-size"):
        block_windows(20, None, 12)


def test_trajectory_classification_counts():
    m = 9
    states = torch.tensor([[m, m, m, m], [1, m, m, 2], [1, 3, 4, m], [5, 3, 4, 6]]).unsqueeze(1)
    tr = Trajectory(states, ["a", "b", "c"], m)
    c = tr.counts()
    assert c.revealed[:, 0].tolist() == [2, 2, 1]
    assert c.revised[:, 0].tolist() == [0, 0, 1]
    assert c.remasked[:, 0].tolist() == [0, 1, 0]
    assert tr.transitions()[2, 0].tolist() == [2, 0, 0, 1]
    udlm = Trajectory(torch.tensor([[[1, 2]], [[1, 3]]]), ["x"], None)
    assert udlm.counts().revised.tolist() == [[1]]


@pytest.mark.parametrize("k,mask_id", [(0.0, 6), (0.1, 6), (1.0, 6), (1.0, None)])
@pytest.mark.parametrize("alpha_s", [0.6, 1.0])
def test_sample_posterior_is_exact_in_distribution(k, mask_id, alpha_s):
    """Chi-square of lean draws against `posterior_probs` for masked, clean and noisy z_t."""
    V, n = 7, 20_000
    kern = MixedKernel(V, mask_id, k)
    g = torch.Generator().manual_seed(int(10 * k) + int(10 * alpha_s))
    logits = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    if mask_id is not None:
        logits[mask_id] = float("-inf")
    p = torch.softmax(logits, -1)
    states = [0, 3] + ([mask_id] if mask_id is not None else [])
    probs = p.expand(1, n * len(states), V)
    z_t = torch.tensor(states).repeat_interleave(n)[None]
    at, as_ = torch.tensor([0.3]), torch.tensor([alpha_s])
    z_s = sample_posterior(kern, probs, z_t, at, as_, generator=g)
    ref = kern.posterior_probs(probs[:, ::n], z_t[:, ::n], at, as_)[0]
    for i in range(len(states)):
        counts = torch.bincount(z_s[0, i * n : (i + 1) * n], minlength=V).double()
        expected = ref[i] * n
        assert (counts[expected == 0] == 0).all()
        keep = expected > 0
        if keep.sum() > 1:
            assert (
                chisquare(counts[keep], expected[keep] * counts.sum() / expected.sum()).pvalue
                > 1e-3
            )


def test_sample_posterior_k0_keeps_visible_and_is_reproducible():
    V = 50
    kern = MixedKernel.mdlm(V, V - 1)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(
        torch.randn(2, 64, V, generator=g).index_fill(-1, torch.tensor([V - 1]), -1e9), -1
    )
    z_t = torch.randint(V, (2, 64), generator=g)
    at, as_ = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 1.0])
    a = sample_posterior(kern, probs, z_t, at, as_, torch.Generator().manual_seed(3))
    b = sample_posterior(kern, probs, z_t, at, as_, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    visible = z_t != V - 1
    assert torch.equal(a[visible], z_t[visible])
    assert not (a[1] == V - 1).any()  # α_s = 1: no mask survives the final step


# ------------------------------------------------------------------ dense references (issue 20)


def _dense_bayes_posterior(p: torch.Tensor, z: torch.Tensor, k: float, at: float, as_: float):
    """p(z_s = e | z_t) ∝ Σ_x p_θ(x)·q(z_s = e | x)·q(z_t | z_s = e) by brute force over V.

    Built from V × V matrices: q(· | x) = α·onehot(x) + (1 − α)·r and Q_{t|s} = α_{t|s}·I +
    β_{t|s}·1 r^T; no closed form of the posterior. p (B, L, V), z (B, L) -> (B, L, V) float64.
    """
    n = p.shape[-1]
    r = torch.full((n,), k / n, dtype=torch.float64)
    r[M] += 1.0 - k
    eye = torch.eye(n, dtype=torch.float64)
    q_s = as_ * eye + (1.0 - as_) * r  # q_s[x, e] = q(z_s = e | x)
    a_ts = at / as_
    Q = a_ts * eye + (1.0 - a_ts) * r  # Q[e, z] = Q_{t|s}(z_t = z | z_s = e)
    joint = p.double() @ q_s  # (B, L, V): Σ_x p_θ(x)·q(z_s = e | x)
    joint = joint * Q[:, z].permute(1, 2, 0)  # times Q_{t|s}(z_t | e)
    return joint / joint.sum(-1, keepdim=True)


def _dense_remdm(p: torch.Tensor, z: torch.Tensor, at: float, as_: float, sigma: float):
    """ReMDM's q_σ(z_s | z_t, x) with x ~ p_θ, from its defining constraints, looped over V.

    Visible z_t = j: stay with prob 1 − σ, re-mask with σ. Masked z_t: reveal x with the prob λ
    that keeps the marginal q(z_s = x | x) = α_s, i.e. α_t·(1 − σ) + (1 − α_t)·λ = α_s.
    """
    lam = (as_ - at * (1.0 - sigma)) / (1.0 - at)
    out = torch.zeros(*z.shape, p.shape[-1], dtype=torch.float64)
    for b in range(z.shape[0]):
        for pos in range(z.shape[1]):
            j = int(z[b, pos])
            if j == M:
                for x in range(p.shape[-1]):
                    out[b, pos, x] += lam * float(p[b, pos, x])
                    out[b, pos, M] += (1.0 - lam) * float(p[b, pos, x])
            else:
                out[b, pos, j] += 1.0 - sigma
                out[b, pos, M] += sigma
    return out


@pytest.mark.parametrize("eta,strategy", [(0.2, "cap"), (0.9, "cap"), (0.5, "rescale")])
def test_remdm_step_matches_dense_remasking_reference(eta, strategy):
    at, as_ = 0.4, 0.7  # σ_max = min(1, 0.3 / 0.4) = 0.75
    sigma_max = min(1.0, (1.0 - as_) / at)
    sigma = min(eta, sigma_max) if strategy == "cap" else eta * sigma_max
    kern = MixedKernel.mdlm(V, M)
    z = torch.tensor([[M, 0, M, 3, 5], [2, M, M, 1, M]])
    p = _probs(2, 5, seed=5)
    remdm = ReMDM(eta, rescale=strategy == "rescale")
    out = remdm.step(kern, p, z, _times(2, at, as_), None, Fixed.none(z))
    torch.testing.assert_close(out.probs.double(), _dense_remdm(p, z, at, as_, sigma))
    # the draw follows it: visible tokens are re-masked at rate σ (binomial, 5 SE)
    n = 4000
    zz = torch.tensor([[0, M]]).expand(n, 2)
    draw = remdm.step(
        kern, _probs(n, 2), zz, _times(n, at, as_), torch.Generator().manual_seed(0),
        Fixed.none(zz),
    ).z_s  # fmt: skip
    rate = float((draw[:, 0] == M).double().mean())
    assert abs(rate - sigma) < 5 * math.sqrt(sigma * (1 - sigma) / n)


@pytest.mark.parametrize("k", [0.3, 0.8])
def test_final_greedy_is_argmax_of_dense_posterior_for_k_positive(k):
    """For k > 0 the greedy final step may replace a visible token the model disbelieves."""
    kern = MixedKernel(V, M, k)
    g = torch.Generator().manual_seed(7)
    z = torch.randint(0, V, (4, 16), generator=g)
    p = _probs(4, 16, seed=8)
    at = 0.05
    out = GreedyFinal().step(kern, p, z, torch.full((4,), at), None, Fixed.none(z))
    dense = _dense_bayes_posterior(p, z, k, at, 1.0)
    expect = dense.argmax(-1)
    assert torch.equal(out.z_s, expect)
    torch.testing.assert_close(out.probs, dense, check_dtype=False)  # the distribution argmaxed
    visible = z != M
    assert bool((out.z_s[visible] != z[visible]).any()), "the case must revise a visible token"
    assert bool((out.z_s != M).all())


def test_ancestral_posterior_matches_dense_bayes():
    """Independent check of the closed form the ancestral and final steps use."""
    for k in (0.0, 0.3, 1.0):
        kern = MixedKernel(V, M, k)
        z = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(2))
        p = _probs(3, 6, seed=4)
        for at, as_ in ((0.2, 0.5), (0.6, 1.0)):
            got = kern.posterior_probs(p, z, torch.full((3,), at), torch.full((3,), as_))
            torch.testing.assert_close(got.double(), _dense_bayes_posterior(p, z, k, at, as_))


def test_logit_filter_removes_the_mask_even_when_it_is_the_top_logit():
    logits = torch.tensor([[[1.0, 2.0, 0.5, -1.0, 0.0, 3.0, 9.0]]])  # mask (id 6) on top
    keep = torch.tensor([1.0, 2.0, 0.5, -1.0, 0.0, 3.0]) / 0.5
    want = torch.cat([keep.softmax(-1), torch.zeros(1)])
    torch.testing.assert_close(LogitFilter(temperature=0.5).probs(logits, M)[0, 0], want)
    top2 = LogitFilter(top_k=2).probs(logits, M)[0, 0]  # the two best data ids: 5 and 1
    torch.testing.assert_close(top2, torch.tensor([0, 1, 0, 0, 0, math.e, 0]) / (1 + math.e))


def test_guided_logits_is_the_cfg_combination_of_two_calls():
    """logits_w = (1 + w)·logits(z | c) − w·logits(z | ∅), from two direct denoiser calls."""
    from xdlm.sampling import guided_logits

    g = torch.Generator().manual_seed(0)
    table = torch.randn(4, V, V, generator=g)  # row 3 = the null class

    def denoiser(z, t, attention_mask=None, cond=None):
        c = torch.full((z.shape[0],), 3) if cond is None else cond
        return table[c[:, None], z]

    z, labels = torch.tensor([[0, M, 2], [M, 1, M]]), torch.tensor([0, 2])
    cond, uncond = denoiser(z, None, None, labels), denoiser(z, None, None, None)
    got = guided_logits(denoiser, z, None, labels, 1.5)
    torch.testing.assert_close(got, 2.5 * cond - 1.5 * uncond)
    assert guided_logits(denoiser, z, None, labels, 0.0) is not None
    with pytest.raises(ValueError, match="guidance needs class labels"):
        guided_logits(denoiser, z, None, None, 1.0)


def test_step_arguments_at_their_bounds():
    assert float(UniformT(t_end=0.0).times(LogLinear(), 2)[-1]) == 0.0  # t_end = 0 is allowed
    with pytest.raises(ValueError, match="t_end must be in"):
        UniformT(t_end=1.0).times(LogLinear(), 2)
    assert ReMDM(eta=1.0).eta == 1.0  # η = 1 is the largest allowed
    with pytest.raises(ValueError, match="eta must be in"):
        ReMDM(eta=1.01)
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    assert parse_infill("a[BLANK]", enc, 1) == [97, None]  # one free position is allowed
    with pytest.raises(ValueError, match="blank"):
        parse_infill("a[BLANK]", enc, 0)
