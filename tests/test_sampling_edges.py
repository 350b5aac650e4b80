"""The samplers' shell at its edges (issue 29): the one-line errors, ties, empty rows and the
caller's device, found by reading the surviving mutants of `sampling/` (docs/testing.md)."""

from __future__ import annotations

import time

import pytest
import torch

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Cosine, LogLinear
from xdlm.sampling import (
    XDM,
    Ancestral,
    Confidence,
    Doubling,
    Fixed,
    LogitFilter,
    ReMDM,
    StepTimes,
    Trajectory,
    UniformAlpha,
    block_windows,
    classify,
    edit_budget,
    fixed_from_template,
    guided_logits,
    parse_infill,
)
from xdlm.sampling.conditioning import Window
from xdlm.sampling.confidence import top_n
from xdlm.sampling.xdm import Block, blocks

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


def _xdm_step(sampler, logits, z, n_reveal, scratch=None):
    """One `XDM.step` over the whole row, no edits."""
    b = z.shape[0]
    zero, every = torch.zeros(b, dtype=torch.long), torch.ones_like(z, dtype=torch.bool)
    return sampler.step(logits, z, M, z.shape[1], torch.full((b,), n_reveal), zero, every,
                        None, scratch)  # fmt: skip


@pytest.mark.parametrize("rank_dtype", ["logits", "float64"])
def test_xdm_reuses_its_work_buffer_until_the_shape_or_dtype_changes(rank_dtype):
    sampler, z = XDM(rank_dtype=rank_dtype), torch.full((2, 6), M)
    logits = torch.randn(2, 6, V, generator=torch.Generator().manual_seed(0))
    first = _xdm_step(sampler, logits, z, 1)  # no scratch given: a fresh one per call
    scratch: dict[str, torch.Tensor] = {}
    again = _xdm_step(sampler, logits, z, 1, scratch)
    assert torch.equal(first.z_s, again.z_s) and torch.equal(again.revealed, again.z_s != M)
    (buf,) = scratch.values()
    _xdm_step(sampler, logits, z, 1, scratch)
    assert next(iter(scratch.values())) is buf  # the same step: the buffer is reused
    in_logits = rank_dtype == "logits"  # (B, L, V) in the logits' dtype, else (L, V) float64
    for other in (logits.double(), torch.randn(2, 7, V, dtype=torch.float64)):  # dtype; length
        _xdm_step(sampler, other, torch.full(other.shape[:2], M), 1, scratch)
        (new,) = scratch.values()
        assert new.shape == (other.shape if in_logits else other.shape[1:])
        assert new.dtype == torch.float64
        changed = in_logits or other.shape[1] != 6
        assert (new is not buf) == changed
        buf = new


def test_xdm_float64_ranking_tells_apart_what_float32_ties():
    """p_θ(x̂) of 0.25 against 0.25 + 1.9e-10 (a logit 1e-9 higher): float64 reveals the second
    position, a float32 p_θ would tie and take the first."""
    logits = torch.zeros(1, 2, V)
    logits[..., M] = -1e9
    logits[0, 1, 0] = 1e-9
    out = _xdm_step(XDM(rank_dtype="float64"), logits, torch.full((1, 2), M), 1, {})
    assert out.revealed.tolist() == [[False, True]]


def test_xdm_float64_ranking_normalises_each_position_on_its_own_scale():
    """Position 1's logits are 1000 below position 0's (and more certain): a shift by anything
    but its own maximum underflows to 0/0."""
    logits = torch.zeros(1, 2, V)
    logits[0, 1] = -1000.0
    logits[0, 1, 2] = -998.0  # p_θ(2) = e²/(e² + V − 2) ≈ 0.36 > 1/(V − 1) = 0.25
    logits[..., M] = -1e9
    out = _xdm_step(XDM(rank_dtype="float64"), logits, torch.full((1, 2), M), 1, {})
    assert out.revealed.tolist() == [[False, True]] and out.z_s.tolist() == [[M, 2]]


def test_xdm_never_proposes_the_mask_even_where_its_logit_is_highest():
    logits = torch.zeros(2, 3, V)
    logits[..., 1] = 1.0
    logits[0, 2, M] = 5.0  # the mask's logit wins here; the best real token is 1
    out = _xdm_step(XDM(), logits, torch.full((2, 3), M), 3, {})
    assert out.z_s.tolist() == [[1, 1, 1], [1, 1, 1]]


class _Recording:
    """Zero logits but for token 1; records every call's (batch, attention_mask, cond)."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, t, attention_mask=None, cond=None):
        self.calls.append((z.shape[0], attention_mask, cond))
        logits = torch.zeros(*z.shape, V)
        logits[..., 1] = 1.0
        return logits


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_xdm_passes_the_class_labels_as_cond_and_twice_under_guidance(cfg_scale):
    model, labels = _Recording(), torch.tensor([2, 0])
    out = XDM(cfg_scale=cfg_scale).run(model, MixedKernel(V, M, 0.1), batch_size=2, seq_len=4,
                                       steps=2, generator=None, class_labels=labels)  # fmt: skip
    assert out.tokens.tolist() == [[1] * 4] * 2 and out.nfe == 2 * (1 + (cfg_scale > 0))
    want = labels if cfg_scale == 0.0 else torch.cat([labels, labels])
    for batch, attention_mask, cond in model.calls:
        assert batch == len(want) and attention_mask is None and torch.equal(cond, want)
    XDM(cfg_scale=cfg_scale).run(model, MixedKernel(V, M, 0.1), batch_size=2, seq_len=4,
                                 steps=2, generator=None)  # fmt: skip
    assert model.calls[-1][2] is None  # unconditional: no labels, also not under guidance


def test_xdm_records_only_on_request_with_one_label_per_step():
    kernel, model = MixedKernel(V, M, 0.1), _Recording()
    plain = XDM().run(model, kernel, batch_size=1, seq_len=4, steps=4, generator=None)
    assert plain.trajectory is None
    out = XDM().run(model, kernel, batch_size=1, seq_len=4, steps=4, generator=None,
                    block_size=2, record=True)  # fmt: skip
    assert out.trajectory.labels == ["block 0 step 1", "block 0 step 2",
                                     "block 1 step 1", "block 1 step 2"]  # fmt: skip
    assert out.trajectory.states.shape == (5, 1, 4)
    with pytest.raises(ValueError, match=r"^the xdm sampler needs a mask state \(k < 1\); use "
                       r"'ancestral' for UDLM$"):  # fmt: skip
        XDM().run(model, MixedKernel.udlm(V), batch_size=1, seq_len=4, steps=4, generator=None)


def test_xdm_blocks_at_their_limits():
    assert blocks(8, 8, 4, None) == []  # the prompt fills the canvas: nothing to generate
    assert blocks(7, 8, 4, None) == [Block(7, 8, 4)]  # one generated position
    assert blocks(2, 10, 4, 4) == [Block(2, 6, 2), Block(6, 10, 2)]
    assert blocks(0, 3, 3, 1) == [Block(0, 1, 1), Block(1, 2, 1), Block(2, 3, 1)]  # T = #blocks
    with pytest.raises(ValueError, match="pass a multiple of 3"):
        blocks(0, 3, 2, 1)  # fewer steps than blocks
    with pytest.raises(ValueError, match="pass a block size that divides 3"):
        blocks(0, 3, 3, 2)


@pytest.mark.parametrize("bad,got", [(dict(temperature=-0.5), "-0.5, 0.0"),
                                     (dict(cfg_scale=-0.5), "0.0, -0.5")])  # fmt: skip
def test_xdm_refuses_a_negative_temperature_or_guidance_each_alone(bad, got):
    with pytest.raises(ValueError) as refused:
        XDM(**bad)
    assert str(refused.value) == f"xdm needs temperature >= 0 and cfg_scale >= 0, got {got}"


def test_xdm_wall_time_is_the_time_it_ran():
    before = time.perf_counter()
    out = XDM().run(_Recording(), MixedKernel(V, M, 0.1), batch_size=1, seq_len=4, steps=2,
                    generator=None)  # fmt: skip
    assert 0.0 < out.wall_time <= time.perf_counter() - before


def test_block_windows_accept_one_and_the_context_length_and_refuse_past_it():
    assert block_windows(3, 1, 2) == [Window(0, 0, 1), Window(0, 1, 2), Window(1, 2, 3)]
    assert block_windows(4, 2, 2) == [Window(0, 0, 2), Window(2, 2, 4)]  # block = context
    with pytest.raises(ValueError) as refused:
        block_windows(4, 3, 2)
    assert str(refused.value) == "block_size must be in [1, context_len=2], got 3"
    with pytest.raises(ValueError) as too_long:
        block_windows(5, None, 4)
    assert str(too_long.value) == ("seq_len=5 exceeds the model's context 4; pass --block-size "
                                   "for semi-autoregressive generation")  # fmt: skip


def test_a_template_longer_than_seq_len_names_the_fix_and_one_fits_on_the_device():
    with pytest.raises(ValueError) as refused:
        fixed_from_template([1, None, 2], 1, 2)
    assert str(refused.value) == ("the prompt/template has 3 tokens but seq_len=2; raise "
                                  "--seq-len or shorten the text")  # fmt: skip
    fixed = fixed_from_template([1, None, 2], 2, 3, device="meta")  # exactly seq_len
    assert fixed.mask.device.type == fixed.tokens.device.type == "meta"


def test_an_empty_piece_of_an_infill_text_is_never_encoded():
    """A tokenizer may add special tokens even to "": blanks at the start, at the end and side
    by side leave no empty piece to encode."""

    def encode(piece: str) -> list[int]:
        assert piece, "encoded an empty piece"
        return [ord(c) for c in piece]

    assert parse_infill("[BLANK]a[BLANK:1][BLANK:2]", encode, 2) == [None, None, 97, None,
                                                                     None, None]  # fmt: skip


def test_guidance_passes_t_to_both_calls_and_needs_labels():
    seen = []

    def model(z, t, attention_mask=None, cond=None):
        seen.append((t, cond))
        return torch.zeros(*z.shape, V)

    z, t, labels = torch.full((2, 3), M), torch.tensor([0.5, 0.5]), torch.tensor([1, 0])
    guided_logits(model, z, t, labels, 2.0)
    assert [(s is t, c) for s, c in seen] == [(True, labels), (True, None)]
    with pytest.raises(ValueError) as refused:
        guided_logits(model, z, t, None, 2.0)
    assert str(refused.value) == "guidance needs class labels; pass --class-label"


def test_xdm_run_hands_one_work_buffer_dict_to_every_step(monkeypatch):
    """The (B, L, V) softmax buffer is allocated once per run, not once per step."""
    seen, step = [], XDM.step

    def spy(self, *args):
        seen.append(args[-1])
        return step(self, *args)

    monkeypatch.setattr(XDM, "step", spy)
    XDM().run(_Recording(), MixedKernel(V, M, 0.1), batch_size=1, seq_len=4, steps=4,
              generator=None, block_size=2)  # fmt: skip
    assert len(seen) == 4 and all(s is seen[0] for s in seen) and isinstance(seen[0], dict)
