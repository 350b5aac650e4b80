"""The samplers' shell at its edges (issue 29): the one-line errors, ties, empty rows and the
caller's device, found by reading the surviving mutants of `sampling/` (docs/testing.md)."""

from __future__ import annotations

import pytest
import torch

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Cosine, LogLinear
from xdlm.sampling import (
    Ancestral,
    Confidence,
    Doubling,
    Fixed,
    LogitFilter,
    ReMDM,
    StepTimes,
    Trajectory,
    UniformAlpha,
    classify,
    edit_budget,
)
from xdlm.sampling.confidence import top_n

V, M = 5, 4


def test_top_n_breaks_ties_by_position_and_never_picks_a_non_finite_score():
    ties = torch.zeros(2, 128)  # long rows: an unstable sort would shuffle the ties
    assert top_n(ties, torch.tensor([3, 0])).nonzero().tolist() == [[0, 0], [0, 1], [0, 2]]
    inf = float("inf")
    score = torch.tensor([[-inf, 1.0, -inf, 1.0, inf]])  # +inf is not a score either
    assert top_n(score, torch.tensor([5])).tolist() == [[False, True, False, True, False]]


def test_confidence_edits_the_largest_margins_not_the_most_confident():
    """k = 0.5, one reveal: budget ⌊1·1⌋ = 1 edit. Position 0: p(x̂) = 0.6 over p(z) = 0.3
    (margin 0.3); position 1: p(x̂) = 0.6 over p(z) = 0 (margin 0.6) is the one edited."""
    kernel = MixedKernel(V, M, 0.5)
    p = torch.tensor([[
        [0.3, 0.6, 0.1, 0.0, 0.0],
        [0.0, 0.6, 0.4, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0, 0.0],
    ]])  # fmt: skip
    z = torch.tensor([[0, 0, M]])
    times = StepTimes(torch.tensor([0.2]), torch.tensor([0.6]), 1)
    out = Confidence().step(kernel, p, z, times, None, Fixed.none(z))
    assert out.z_s.tolist() == [[0, 1, 2]]


def test_confidence_needs_a_mask_state_and_starts_on_the_callers_device():
    with pytest.raises(ValueError, match="^the confidence sampler needs a mask state; use "
                       "'ancestral' for UDLM$"):  # fmt: skip
        Confidence().prior(MixedKernel.udlm(V), (2, 3), None, "cpu")
    z = Confidence().prior(MixedKernel(V, M, 0.1), (2, 3), None, "meta")
    assert z.device.type == "meta" and z.shape == (2, 3) and z.dtype == torch.long


def test_the_edit_budget_refuses_k_one_exactly_naming_it():
    n = torch.tensor([1000, 10**6])
    assert edit_budget(0.95, n).tolist() == [19000, 19 * 10**6]  # exact, no float floor
    assert edit_budget(0.999, n).tolist() == [999000, 999 * 10**6]
    with pytest.raises(ValueError, match=r"^the edit budget needs k in \[0, 1\) \(a mask state\), "
                       r"got k=1.0$"):  # fmt: skip
        edit_budget(1.0, n)


def test_classify_gives_int8_codes_on_the_states_device():
    z, z_next = torch.tensor([[M, 1, 2, 3]]), torch.tensor([[0, 1, 0, M]])
    codes = classify(z, z_next, M)
    assert codes.dtype == torch.int8 and codes.tolist() == [[1, 0, 2, 3]]
    on_meta = classify(z.to("meta"), z_next.to("meta"), M)
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.int8


def test_a_trajectory_needs_s_plus_one_states_of_b_by_l_and_s_labels():
    Trajectory(torch.zeros(3, 2, 4), ["a", "b"], M)  # S = 2: accepted
    with pytest.raises(ValueError, match=r"^states must be \(S\+1, B, L\) with S labels; "
                       r"got \(3, 2, 4\) and 3 labels$"):  # fmt: skip
        Trajectory(torch.zeros(3, 2, 4), ["a", "b", "c"], M)  # one label too many
    with pytest.raises(ValueError, match=r"got \(3, 8\) and 2 labels$"):
        Trajectory(torch.zeros(3, 8), ["a", "b"], M)  # the label count fits, the shape not


def test_remdm_keeps_the_distribution_in_p_thetas_dtype_under_float64_times():
    """The loop's α_t, α_s are float64 (the grid's); the one (B, L, V) array stays float32."""
    kernel, z = MixedKernel.mdlm(V, M), torch.tensor([[M, 1, M]])
    p = torch.full((1, 3, V), 0.25).index_fill_(-1, torch.tensor([M]), 0.0)
    times = StepTimes(torch.tensor([0.3], dtype=torch.float64),
                      torch.tensor([0.6], dtype=torch.float64), 2)  # fmt: skip
    out = ReMDM(eta=0.2).step(kernel, p, z, times, torch.Generator(), Fixed.none(z))
    assert out.probs.dtype == torch.float32 and out.probs.shape == (1, 3, V)


@pytest.mark.parametrize("grid", [UniformAlpha(), Doubling()])
def test_alpha_grids_end_at_t_end_where_alpha_is_flat(grid):
    """Cosine's α(1e-5) is 1 − O(1e-10): only float64 keeps t_T = t_end (float32 gives 0)."""
    ts = grid.times(Cosine(), 4)
    assert ts.dtype == torch.float64 and float(ts[0]) == 1.0
    assert abs(float(ts[-1]) - 1e-5) < 1e-9


@pytest.mark.parametrize(
    "schedule,steps,t_end",
    [(LogLinear(), 12, 1e-5), (LogLinear(), 3, 0.75)],  # 2^{1−T} < α_1; 2^{−1} > α_{t_end}
)
def test_the_doubling_grid_stays_between_one_and_t_end_without_turning_back(schedule, steps, t_end):
    ts = Doubling(t_end).times(schedule, steps)
    assert ts.shape == (steps + 1,) and float(ts[0]) == 1.0
    assert bool((ts[1:] <= ts[:-1]).all()) and bool((ts >= t_end - 1e-12).all())
    assert abs(float(ts[-1]) - t_end) < 1e-9


def test_fixed_needs_a_bool_mask_and_tokens_of_one_shape_each_alone():
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^Fixed needs a bool mask and tokens of one shape "
                       r"\(B, L\); got torch.bool \(2, 4\) and \(2, 3\)$"):  # fmt: skip
        Fixed(torch.zeros(2, 4, dtype=torch.bool), tokens)
    with pytest.raises(ValueError, match=r"got torch.int64 \(2, 3\) and \(2, 3\)$"):
        Fixed(torch.zeros(2, 3, dtype=torch.long), tokens)


def test_the_logit_filter_applies_top_k_and_top_p():
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0, 9.0]]])  # the mask's logit is dropped
    full = LogitFilter().probs(logits, M)[0, 0]
    assert full[M] == 0 and bool((full[:M] > 0).all())
    top2 = LogitFilter(top_k=2).probs(logits, M)[0, 0]
    assert top2.tolist()[2:] == [0.0, 0.0, 0.0] and float(top2[0]) > float(top2[1]) > 0
    nucleus = LogitFilter(top_p=0.5).probs(logits, M)[0, 0]  # p(0) = 0.64 ≥ 0.5 alone
    assert nucleus.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_the_ancestral_prior_is_drawn_on_the_callers_device():
    z = Ancestral().prior(MixedKernel(V, M, 0.5), (2, 3), torch.Generator(), "meta")
    assert z.device.type == "meta" and z.shape == (2, 3) and z.dtype == torch.long
