"""The `dilated` sampler and the `doubling` grid: the van der Corput order, the planned reveal
count and positions at a step, reveals from p_θ only (or the posterior's routes), visible
positions on the exact posterior, and at k = 0 with one reveal per step the data's law exactly
under an oracle (where the ancestral sampler with the same grid is measurably off)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from xdlm.builders import build_sampler
from xdlm.config import SampleConfig
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Cosine, LogLinear
from xdlm.eval.oracle import EnumerableData, OracleDenoiser, exact_output_law
from xdlm.sampling import (
    Ancestral,
    Dilated,
    Doubling,
    Fixed,
    StepTimes,
    generate,
    van_der_corput_rank,
)

V, MASK = 5, 4


def _order(length: int) -> list[int]:
    """Positions in the order the plan reveals them."""
    return van_der_corput_rank(length).argsort().tolist()


def test_van_der_corput_order_spreads_every_prefix():
    assert _order(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert _order(6) == [0, 4, 2, 1, 5, 3]  # not a power of two: 3 bits, ids 6 and 7 skipped
    assert _order(2) == [0, 1] and _order(1) == [0]
    assert sorted(_order(64)) == list(range(64))
    assert sorted(_order(64)[:16]) == list(range(0, 64, 4))  # the first quarter: every 4th
    # against the bit reversal written as text; 5 and 65: one past a power of two
    for length, bits in ((64, 6), (1000, 10), (5, 3), (65, 7)):
        reverse = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(length)]
        assert _order(length) == sorted(range(length), key=reverse.__getitem__)


def test_the_rank_of_an_empty_row_is_empty_and_lives_on_the_callers_device():
    assert van_der_corput_rank(0).tolist() == []  # L = 0: no log2(0)
    assert van_der_corput_rank(1).tolist() == [0]
    rank = van_der_corput_rank(8, device="meta")  # built where the caller's rows live
    assert rank.device.type == "meta" and rank.shape == (8,) and rank.dtype == torch.long


def _step(sampler, kernel, p_x0, z_t, a_t, a_s, seed=0, fixed=None):
    b = z_t.shape[0]
    times = StepTimes(torch.full((b,), a_t, dtype=torch.float64),
                      torch.full((b,), a_s, dtype=torch.float64), 2)  # fmt: skip
    fixed = Fixed.none(z_t) if fixed is None else fixed
    return sampler.step(kernel, p_x0, z_t, times, torch.Generator().manual_seed(seed), fixed).z_s


def _leave(k: float, a_t: float, a_s: float) -> float:
    """1 − stay at a masked position: 1 − (β_s/β_t)·(1 − k·β_{t|s})."""
    return 1 - (1 - a_s) / (1 - a_t) * (1 - k * (a_s - a_t) / a_s)


def test_the_plan_reveals_the_expected_count_first_in_order_from_p_theta():
    kernel, length = MixedKernel(V, MASK, 0.1), 8
    z_t = torch.full((3, length), MASK)
    p_x0 = torch.zeros(3, length, V)
    p_x0[..., 1] = 1.0  # p_θ certain of token 1
    assert length * _leave(0.1, 0.25, 0.5) == pytest.approx(2.9333, abs=1e-4)  # n = 3
    z_s = _step(Dilated(), kernel, p_x0, z_t, 0.25, 0.5)
    revealed = (z_s != MASK).nonzero()[:, 1].view(3, -1)
    assert revealed.tolist() == [[0, 2, 4]] * 3  # the first 3 of 0, 4, 2, 6, ...
    assert (z_s[z_s != MASK] == 1).all()  # from p_θ: never the uniform route
    # one masked position fixed (a prompt): never changes, never counted, the plan skips it
    fixed = Fixed(torch.zeros(3, length, dtype=torch.bool).index_fill(1, torch.tensor([4]), True),
                  z_t.clone())  # fmt: skip
    z_s = _step(Dilated(), kernel, p_x0, z_t, 0.25, 0.5, fixed=fixed)
    assert length - 1 == 7 and 7 * _leave(0.1, 0.25, 0.5) == pytest.approx(2.567, abs=1e-3)
    assert (z_s != MASK).nonzero()[:, 1].view(3, -1).tolist() == [[0, 2, 6]] * 3


def test_the_count_rounds_half_up_and_the_last_step_reveals_everything():
    kernel = MixedKernel(V, MASK, 0.0)
    p_x0 = torch.zeros(1, 4, V)
    p_x0[..., 2] = 1.0
    z_t = torch.full((1, 4), MASK)
    # k = 0: 1 − stay = (α_s − α_t)/(1 − α_t); 4 · 0.125 = 0.5 exactly -> 1, 4 · 0.0625 -> 0
    assert (_step(Dilated(), kernel, p_x0, z_t, 0.0, 0.125) != MASK).sum() == 1
    assert (_step(Dilated(), kernel, p_x0, z_t, 0.0, 0.0625) != MASK).sum() == 0
    assert (_step(Dilated(), kernel, p_x0, z_t, 0.5, 1.0) == 2).all()  # α_s = 1: all of them


def test_uniform_reveal_keeps_the_posterior_routes():
    kernel, n = MixedKernel(V, MASK, 0.3), 20_000
    p_x0 = torch.zeros(n, 1, V)
    p_x0[..., 1] = 1.0
    z_s = _step(Dilated(uniform_reveal=True), kernel, p_x0, torch.full((n, 1), MASK), 0.25, 0.75)
    # one masked position, n = ⌊0.73 + ½⌋ = 1: it leaves. P(uniform route | leave) =
    # V·shift / (scale + V·shift), and a uniform id (over all V, m included) is ≠ 1 w.p. 4/5
    assert _leave(0.3, 0.25, 0.75) == pytest.approx(0.7333, abs=1e-4)
    scale, v_shift = 0.5 / 0.75, 0.3 * (0.5 / 0.75) * 0.25 / 0.75
    expected = v_shift / (scale + v_shift) * (V - 1) / V
    share = float((z_s != 1).double().mean())
    assert share == pytest.approx(expected, abs=5 * (expected * (1 - expected) / n) ** 0.5)
    assert expected > 0.05  # and the default never takes it (previous test)


@pytest.mark.parametrize("kernel", [MixedKernel(V, MASK, 0.3), MixedKernel(V, None, 1.0)])
def test_visible_positions_follow_the_exact_posterior(kernel):
    """With no masked position (or no mask state) the step is `Ancestral`'s, draw for draw."""
    g = torch.Generator().manual_seed(3)
    z_t = torch.randint(MASK, (64, 16), generator=g)
    p_x0 = torch.softmax(torch.randn(64, 16, V, generator=g), -1)
    if kernel.mask_id is not None:
        p_x0[..., MASK] = 0.0
        p_x0 = p_x0 / p_x0.sum(-1, keepdim=True)
    dilated = _step(Dilated(), kernel, p_x0, z_t, 0.3, 0.6, seed=5)
    assert torch.equal(dilated, _step(Ancestral(), kernel, p_x0, z_t, 0.3, 0.6, seed=5))
    assert (dilated != z_t).any()  # revisions happened


def _markov() -> EnumerableData:
    transition = torch.tensor([[0.85, 0.1, 0.05], [0.05, 0.9, 0.05], [0.3, 0.1, 0.6]],
                              dtype=torch.float64)  # fmt: skip
    return EnumerableData.markov(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                                 transition, 3)  # fmt: skip


def test_one_reveal_per_step_at_k0_samples_the_law_exactly_under_an_oracle():
    """Any-order autoregression: T = L = 3 doubling steps reveal one token each (counts 1, 1, 1);
    20,000 samples pass a chi-square test against p(x), while the ancestral sampler's exact
    output law on the same grid would fail it by far."""
    data, kernel, schedule = _markov(), MixedKernel(4, 3, 0.0), LogLinear()
    oracle = OracleDenoiser(data, kernel, schedule)
    n = 20_000
    out = generate(oracle, kernel, schedule, batch_size=n, seq_len=3, steps=3,
                   generator=torch.Generator().manual_seed(0), sampler=Dilated(),
                   grid=Doubling(), cache=False, record=True)  # fmt: skip
    steps = out.trajectory.states  # (T + 2, B, L): z_1, after each step, after the final step
    revealed = [int((s == 3).sum(-1).unique().item()) for s in steps]
    assert revealed[:4] == [3, 2, 1, 0]  # exactly one reveal per step, in every sample
    index = (out.tokens * torch.tensor([9, 3, 1])).sum(-1)
    counts = torch.bincount(index, minlength=27).double()
    expected = n * data.probs
    limit = chi2.ppf(1 - 1e-4, 26)
    assert float(((counts - expected) ** 2 / expected).sum()) < limit
    ancestral = n * exact_output_law(oracle, 3, Doubling())
    assert float(((ancestral - expected) ** 2 / expected).sum()) > 10 * limit


@pytest.mark.parametrize("schedule", [LogLinear(), Cosine()])
def test_doubling_grid_doubles_alpha(schedule):
    t = Doubling(t_end=1e-5).times(schedule, 4)
    ends = schedule.alpha(torch.tensor([1.0, 1e-5], dtype=torch.float64))
    expected = torch.tensor([float(ends[0]), 1 / 8, 1 / 4, 1 / 2, float(ends[1])],
                            dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(schedule.alpha(t), expected, rtol=0, atol=1e-9)
    assert t[0] == 1.0 and (t[1:] < t[:-1]).all()
    one = Doubling().times(schedule, 1)
    torch.testing.assert_close(schedule.alpha(one), ends, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Doubling().times(schedule, 0)
    with pytest.raises(ValueError, match="t_end"):
        Doubling(t_end=1.0).times(schedule, 2)


def _peaked(z_t, t, _lengths, _labels):
    """A denoiser sure of id 0 (p ≈ 0.96) wherever it looks; [MASK] is filtered out."""
    logits = torch.full((*z_t.shape, V), -2.0)
    logits[..., 0] = 2.0
    return logits


def test_a_grid_stopped_at_three_quarters_leaves_the_last_quarter_to_the_final_step():
    """`Doubling(t_end)` with α(t_end) = 3/4 (the experiments' `dilated-final`): after the T
    steps exactly L/4 positions are masked, the last in van der Corput order, and the final
    step (one NFE) reveals them; at k > 0 it also revises visible ids, which a final step at
    α ≈ 1 cannot do."""
    schedule, length, steps = LogLinear(), 16, 4
    t_end = float(schedule.t_of_alpha(torch.tensor(0.75, dtype=torch.float64)))
    alphas = schedule.alpha(Doubling(t_end=t_end).times(schedule, steps))
    torch.testing.assert_close(alphas[1:], torch.tensor([1 / 8, 1 / 4, 1 / 2, 3 / 4],
                                                        dtype=torch.float64))  # fmt: skip

    def run(kernel: MixedKernel, end: float):
        return generate(_peaked, kernel, schedule, batch_size=64, seq_len=length, steps=steps,
                        generator=torch.Generator().manual_seed(0), sampler=Dilated(),
                        grid=Doubling(t_end=end), record=True)  # fmt: skip

    out = run(MixedKernel(V, MASK, 0.0), t_end)
    before_final = out.trajectory.states[-2]
    last_quarter = torch.tensor(_order(length)[-length // 4 :])
    assert (before_final[:, last_quarter] == MASK).all()
    assert ((before_final == MASK).sum(-1) == length // 4).all()
    assert out.nfe == steps + 1 and not (out.tokens == MASK).any()

    kernel = MixedKernel(V, MASK, 0.1)

    def revised(end: float) -> tuple[int, float]:
        """(visible ids the final step changed, their expected number under the posterior)."""
        z = run(kernel, end).trajectory.states[-2:]
        visible = z[0] != MASK
        p_x0 = torch.softmax(_peaked(z[0], None, None, None)[..., :MASK], -1)
        p_x0 = torch.cat([p_x0, torch.zeros(*z[0].shape, 1)], -1)
        alpha = schedule.alpha(torch.full((len(z[0]),), end, dtype=torch.float64)).float()
        keep = kernel.posterior_probs(p_x0, z[0], alpha, torch.ones_like(alpha))
        keep = keep.gather(-1, z[0][..., None])
        return int((visible & (z[1] != z[0])).sum()), float((1 - keep[..., 0])[visible].sum())

    changed, expected = revised(t_end)
    assert expected > 5 and abs(changed - expected) < 4 * expected**0.5
    changed, expected = revised(1e-5)
    assert changed == 0 and expected < 1e-3


def test_the_config_builds_it():
    plan = build_sampler(SampleConfig(sampler="dilated", grid="doubling"))
    assert plan.sampler == Dilated() and isinstance(plan.grid, Doubling)
    plan = build_sampler(SampleConfig(sampler="dilated", dilated_uniform_reveal=True))
    assert plan.sampler == Dilated(uniform_reveal=True)
