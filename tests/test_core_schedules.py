"""Schedules, the ψ remainder and the logit filters against their definitions (issue 20: tests
written to kill surviving mutants of core/schedules.py, remainders.py and categorical.py)."""

import math

import mpmath
import pytest
import torch

from xdlm.core.categorical import filter_logits
from xdlm.core.remainders import log1p_remainder, mixed_gbar_small
from xdlm.core.schedules import make_schedule, schedule_spec

SCHEDULES = [
    ("loglinear", {"eps": 1e-3}),
    ("linear", {}),
    ("cosine", {"eps": 0.05}),
    ("polynomial", {"power": 3.0, "eps": 0.02}),
]


@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_schedule_inverse_derivative_and_end_points(name, kw):
    s = make_schedule(name, **kw)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(s.t_of_alpha(s.alpha(t)), t, rtol=1e-9, atol=1e-9)
    h = 1e-6
    fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(s.dalpha(t), fd, rtol=1e-6, atol=1e-8)
    ends = s.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([1.0, kw.get("eps", 0.0)], dtype=torch.float64))
    assert make_schedule(**schedule_spec(s)) == s


def test_schedule_arguments_are_checked():
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="eps must be in"):
            make_schedule("loglinear", eps=bad)
    with pytest.raises(ValueError, match="power must be > 0"):
        make_schedule("polynomial", power=0.0)
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        make_schedule("exp")


def _psi(u: float) -> float:
    with mpmath.workdps(50):
        return float(mpmath.mpf(u) - mpmath.log1p(mpmath.mpf(u)))


def test_log1p_remainder_against_50_digit_arithmetic():
    """ψ(u) = u − log1p(u) to ~1e-14 relative on both sides of the series switch at |u| = 1e-2,
    where the u⁵…u⁸ terms of the series still matter at that accuracy."""
    us = [9.9e-3, -9.9e-3, 5e-3, -3e-3, 1e-4, 1e-7, 1.01e-2, 0.3, -0.6, 4.0]
    got = log1p_remainder(torch.tensor(us, dtype=torch.float64))
    want = torch.tensor([_psi(u) for u in us], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def test_mixed_gbar_small_equals_the_log_form_exactly():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=g, dtype=torch.float64)
    logits[:, 5] = -math.inf  # the mask column
    logp, lam = logits.log_softmax(-1), torch.tensor([1e-3, 0.05, 0.7], dtype=torch.float64)
    got = mixed_gbar_small(logp, lam)
    with mpmath.workdps(50):
        want = [
            float(mpmath.log1p(mpmath.mpf(float(l))) - sum(
                mpmath.log1p(mpmath.mpf(float(l)) * mpmath.exp(mpmath.mpf(float(lp))))
                for lp in row
            ))
            for l, row in zip(lam, logp, strict=True)
        ]  # fmt: skip
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_top_p_filters_each_row_of_a_batched_tensor():
    """(B, L, V) logits: every row keeps its smallest prefix of sorted tokens with mass ≥ p."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=g)
    out = filter_logits(logits, top_p=0.6)
    for b in range(2):
        for pos in range(3):
            p = logits[b, pos].softmax(-1)
            order = p.argsort(descending=True)
            need = int((p[order].cumsum(0) < 0.6).sum()) + 1  # the first to cross 0.6 stays
            kept = set(order[:need].tolist())
            got = {i for i in range(7) if out[b, pos, i] > -math.inf}
            assert got == kept, (b, pos)
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2.0)
    top2 = filter_logits(logits, top_k=2)
    assert bool(((top2 > -math.inf).sum(-1) == 2).all())
    for kwargs, match in (
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": 0.0}, "temperature"),
    ):
        with pytest.raises(ValueError, match=match):
            filter_logits(logits, **kwargs)  # fmt: skip
