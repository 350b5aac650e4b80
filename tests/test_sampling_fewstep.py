"""Few-step samplers for revisable tokens: the predictor-corrector (`pc`) leaves the marginal
invariant under an oracle denoiser, exactly and as sampled; threshold decoding (`threshold`)
reveals / revises / re-masks at its limits and always terminates in T steps."""

from __future__ import annotations

import pytest
import torch

from xdlm.builders import build_sampler
from xdlm.config import SampleConfig
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import LogLinear
from xdlm.sampling import Fixed, PredictorCorrector, StepTimes, Threshold, generate

V, MASK = 5, 4  # 4 data tokens + the mask


def _law() -> torch.Tensor:
    """A fixed data law π over the 4 data ids (π(m) = 0), (V,) float64."""
    return torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)


def _oracle(kernel: MixedKernel, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The oracle p_θ for L = 1, z (B, 1) -> (B, 1, V): the p_θ whose kernel posterior is the
    true reverse q(z_s | z_t = z), i.e. p̃(x) ∝ q(x | z)/f_α(x, z) with q(x | z) ∝ π(x)·f_α(x, z)
    (docs/sampling.md; at a masked position p̃ is the true posterior q(x | m))."""
    eye = torch.eye(V, dtype=torch.float64)
    f = kernel.marginal_probs(eye, alpha[:1].expand(V))  # (x, e): f_α(x, e)
    post = _law().unsqueeze(-1) * f  # (x, e): ∝ q(x | z = e)
    tilde = torch.where(f > 0, post / post.sum(0, keepdim=True) / f, 0.0)
    tilde = tilde / tilde.sum(0, keepdim=True)
    return tilde[:, z.squeeze(-1)].T.unsqueeze(1)


def _marginal(kernel: MixedKernel, alpha: float) -> torch.Tensor:
    eye = torch.eye(V, dtype=torch.float64)
    return _law() @ kernel.marginal_probs(eye, torch.full((V,), alpha, dtype=torch.float64))


@pytest.mark.parametrize("k", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_corrector_leaves_the_marginal_invariant_exactly(k, eta):
    """q_s · C = q_s for the corrector's transition matrix C = Q_{c|s} · p(z_s | z_c) (oracle)."""
    kernel = MixedKernel(V, MASK, k)
    eye = torch.eye(V, dtype=torch.float64)
    a_t, a_s = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    a_c = PredictorCorrector(eta).corrector_alpha(StepTimes(a_t, a_s, 2))
    forward = kernel.marginal_probs(eye, (a_c / a_s).expand(V))  # (d, z): Q_{c|s}(z | d)
    states = torch.arange(V).unsqueeze(-1)  # every z_c, (V, 1)
    back = kernel.posterior_probs(
        _oracle(kernel, states, a_c), states, a_c.expand(V), a_s.expand(V)
    ).squeeze(1)  # fmt: skip  (z, e)
    q_s = _marginal(kernel, 0.7)
    torch.testing.assert_close(q_s @ forward @ back, q_s, rtol=0, atol=1e-12)


def test_corrector_move_as_sampled_keeps_the_marginal():
    """The code path: z_s ~ q_s, one `correct` move with the oracle, frequencies stay q_s."""
    kernel, n = MixedKernel(V, MASK, 0.1), 200_000
    g = torch.Generator().manual_seed(0)
    q_s = _marginal(kernel, 0.7)
    z_s = torch.multinomial(q_s, n, replacement=True, generator=g).unsqueeze(-1)  # (n, 1)
    times = StepTimes(torch.full((n,), 0.3, dtype=torch.float64),
                      torch.full((n,), 0.7, dtype=torch.float64), 2)  # fmt: skip
    calls = []

    def denoise(z, alpha):
        calls.append(alpha)
        return _oracle(kernel, z, alpha).float()

    out = PredictorCorrector(0.5).correct(kernel, denoise, z_s, times, g, Fixed.none(z_s))
    freq = torch.bincount(out.squeeze(-1), minlength=V).double() / n
    se = (q_s * (1 - q_s) / n).sqrt()
    assert len(calls) == 1 and float(calls[0][0]) == pytest.approx(0.5)  # α_c = 0.7 − 0.5·0.4
    assert ((freq - q_s).abs() <= 5 * se + 1e-12).all(), (freq, q_s)


def test_pc_eta_limits():
    assert PredictorCorrector(1.0).eta == 1.0
    for bad in (0.0, 1.0001):
        with pytest.raises(ValueError, match="eta must be in"):
            PredictorCorrector(bad)
    with pytest.raises(ValueError, match="eta must be in"):
        build_sampler(SampleConfig(sampler="pc", pc_eta=0.0))
    assert build_sampler(SampleConfig(sampler="pc", pc_eta=0.25)).sampler.eta == 0.25


class _Fixed(torch.nn.Module):
    """A denoiser with the same logits (L, V) at every call, counting calls."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, z, t, attention_mask=None, cond=None):
        self.calls += 1
        return self.logits.expand(z.shape[0], -1, -1)


def test_pc_generates_clean_samples_with_one_extra_call_per_step():
    kernel, steps = MixedKernel(V, MASK, 0.1), 4
    model = _Fixed(torch.randn(6, V))
    out = generate(model, kernel, LogLinear(), batch_size=3, seq_len=6, steps=steps,
                   generator=torch.Generator().manual_seed(1),
                   sampler=PredictorCorrector(0.5))  # fmt: skip
    assert (out.tokens != MASK).all() and out.tokens.shape == (3, 6)
    assert out.nfe == model.calls and steps + 1 < out.nfe <= 2 * steps + 1


def _times(steps_left: int) -> StepTimes:
    return StepTimes(torch.tensor([0.2]), torch.tensor([0.6]), steps_left)


def test_threshold_revises_at_the_margin_and_remasks_below_rho():
    """k = 0.1, three visible positions and one masked: revise (re-draw from p_θ) iff
    max p_θ − p_θ(j) ≥ δ (0.5 exactly revises, 0.49 does not); re-mask iff p_θ(j) < ρ and
    steps remain."""
    kernel = MixedKernel(V, MASK, 0.1)
    p = torch.tensor([[
        [0.0, 0.5, 0.5, 0.0, 0.0],      # z = 0: margin 0.5 -> re-drawn: 1 or 2
        [0.255, 0.745, 0.0, 0.0, 0.0],  # z = 0: margin 0.49 -> kept (or re-masked below)
        [0.0, 0.0, 0.0, 1.0, 0.0],      # z = 0: p(0) = 0 < ρ, but margin 1 -> revised to 3
        [0.0, 0.0, 1.0, 0.0, 0.0],      # masked, certainty 1 -> revealed as 2
    ]])  # fmt: skip
    z = torch.tensor([[0, 0, 0, MASK]])
    sampler = Threshold(threshold=0.9, revise_margin=0.5, remask_below=0.3)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        out = sampler.step(kernel, p, z, _times(3), g, Fixed.none(z)).z_s[0].tolist()
        assert out[0] in (1, 2) and out[1:] == [MASK, 3, 2]
        last = sampler.step(kernel, p, z, _times(1), g, Fixed.none(z)).z_s[0].tolist()
        assert last[0] in (1, 2) and last[1:] == [0, 3, 2]  # never re-masks at the end
    mdlm = sampler.step(MixedKernel(V, MASK, 0.0), p, z, _times(3), torch.Generator(),
                        Fixed.none(z)).z_s  # fmt: skip
    assert mdlm.tolist() == [[0, 0, 0, 2]]  # k = 0: visible tokens never change


def test_threshold_keeps_a_token_exactly_at_rho_and_remasks_with_two_steps_left():
    """ρ = 0.25: p_θ(j) = 0.25 is kept, 0.125 re-masked while two steps remain; of two masked
    positions (M = 2, steps_left = 2: n = 1) the uncertain one (0.5 < τ) stays masked, although
    its best token beats [MASK] by the margin δ: revision is for visible tokens only."""
    kernel = MixedKernel(V, MASK, 0.1)
    p = torch.tensor([[
        [0.25, 0.5, 0.25, 0.0, 0.0],    # z = 0: p(0) = ρ exactly, margin 0.25 < δ -> kept
        [0.125, 0.5, 0.375, 0.0, 0.0],  # z = 0: p(0) < ρ, margin 0.375 < δ -> re-masked
        [0.5, 0.5, 0.0, 0.0, 0.0],      # masked, certainty 0.5 < τ, not in the top n -> stays
        [0.0, 0.0, 1.0, 0.0, 0.0],      # masked, certainty 1 -> revealed as 2
    ]])  # fmt: skip
    z = torch.tensor([[0, 0, MASK, MASK]])
    sampler = Threshold(threshold=0.9, revise_margin=0.5, remask_below=0.25)
    out = sampler.step(kernel, p, z, _times(2), torch.Generator().manual_seed(0), Fixed.none(z))
    assert out.z_s.tolist() == [[0, MASK, MASK, 2]]


def test_threshold_reveals_at_least_the_schedule_and_terminates():
    kernel, steps, length = MixedKernel(V, MASK, 0.0), 4, 8
    flat = torch.zeros(length, V)  # p_θ uniform over the 4 data ids: confidence 0.25 < τ
    never = generate(_Fixed(flat), kernel, LogLinear(), batch_size=2, seq_len=length,
                     steps=steps, generator=torch.Generator().manual_seed(0),
                     sampler=Threshold(threshold=1.0), record=True)  # fmt: skip
    masks = [int((s == MASK).sum(-1)[0]) for s in never.trajectory.states]
    assert masks == [8, 6, 4, 2, 0]  # ⌈M / steps_left⌉ = 2 a step, none above τ
    always = generate(_Fixed(flat), kernel, LogLinear(), batch_size=2, seq_len=length,
                      steps=steps, generator=torch.Generator().manual_seed(0),
                      sampler=Threshold(threshold=0.25))  # fmt: skip
    assert (always.tokens != MASK).all() and always.nfe == 2  # all at step 1; then cached
    one = generate(
        _Fixed(flat),
        kernel,
        LogLinear(),
        batch_size=2,
        seq_len=length,
        steps=1,
        generator=torch.Generator().manual_seed(0),
        sampler=Threshold(),
    )
    assert (one.tokens != MASK).all() and one.nfe == 1


def test_threshold_limits():
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="threshold must be in"):
            Threshold(threshold=bad)
    plan = build_sampler(SampleConfig(sampler="threshold", threshold=0.8, threshold_revise=0.3,
                                      threshold_remask=0.05))  # fmt: skip
    assert plan.sampler == Threshold(0.8, 0.3, 0.05)
