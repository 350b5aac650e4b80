"""Exact few-step sampling error with an oracle denoiser, on an enumerable data distribution.

The NELBO trains p_θ towards the denoiser whose plug-in posterior is the exact per-position
reverse marginal: p(x^l | z_t^{−l}), the data posterior given the other positions
(`OracleDenoiser`).
On a tiny joint p(x) (D data tokens, length L, all D^L sequences listed) that oracle is computed
by Bayes, and the law p_T(x) of the T-step ancestral sampler's output is
propagated exactly over all V^L states: given z_t, a reverse step factorises over positions,
so its transition matrix is a product of L per-position posteriors (xdlm-math.md, "Reverse
step"). TV(p_T, p) and KL(p ‖ p_T) then measure the sampler's factorisation error alone, with
no training noise, for any uniform share k. As T → ∞ both go to 0 for every k.

Shapes: N = D^L data sequences, S = V^L noisy states, B batch, L length, V states (mask incl.).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule
from xdlm.sampling.loop import PAPER_GRID
from xdlm.sampling.steps import TimeGrid


def all_sequences(vocab: int, length: int) -> Tensor:
    """Every sequence over `vocab` ids, (vocab^length, length), lexicographic: row index
    Σ_l z^l·vocab^(length−1−l)."""
    digits = torch.arange(vocab**length).unsqueeze(-1)
    powers = vocab ** torch.arange(length - 1, -1, -1)
    return digits.div(powers, rounding_mode="floor") % vocab


@dataclass(frozen=True)
class EnumerableData:
    """A distribution p(x) over all D^L sequences: `sequences` = all_sequences(D, L) (N, L),
    `probs` (N,) float64."""

    sequences: Tensor
    probs: Tensor

    def __post_init__(self) -> None:
        n, length = self.sequences.shape
        if not torch.equal(self.sequences, all_sequences(self.num_tokens, length)):
            raise ValueError("sequences must be all_sequences(D, L), every sequence in order")
        if self.probs.shape != (n,) or abs(float(self.probs.sum()) - 1.0) > 1e-9:
            raise ValueError(f"probs must be a distribution over the {n} sequences")

    @classmethod
    def markov(cls, initial: Tensor, transition: Tensor, length: int) -> EnumerableData:
        """p(x) = π_0(x^1)·Π_l P(x^{l+1} | x^l) for π_0 (D,) and a row-stochastic P (D, D)."""
        d = transition.shape[0]
        if transition.shape != (d, d) or initial.shape != (d,):
            raise ValueError(
                f"need initial (D,) and transition (D, D), got "
                f"{tuple(initial.shape)} and {tuple(transition.shape)}"
            )
        seqs = all_sequences(d, length)
        logp = initial.double().log()[seqs[:, 0]]
        logp = logp + transition.double().log()[seqs[:, :-1], seqs[:, 1:]].sum(-1)
        probs = logp.exp()
        return cls(seqs, probs / probs.sum())

    @property
    def num_tokens(self) -> int:
        """D, the number of data ids."""
        return int(self.sequences.max()) + 1


class OracleDenoiser:
    """The ideal p_θ for the plug-in posterior p_θ(z_s | z_t) = Q_{t|s}(z_t | e)·f_{α_s}(p_θ, e)
    / f_{α_t}(p_θ, z_t) that `Ancestral` samples (docs/math.md, "The ideal denoiser").

    `leave_one_out=True` (the NELBO optimum): p_θ(x^l = e | z_t) = p(x^l = e | z_t^{−l}), the
    data posterior given every OTHER position. With it the plug-in posterior equals the exact
    per-position reverse marginal Σ_x p(x^l | z_t)·q(z_s^l | z_t^l, x^l) for any step (t, s),
    for every k.

    `leave_one_out=False`: the posterior mean p(x^l = e | z_t) ∝ p(x^l = e | z_t^{−l})·q(z_t^l | e),
    the usual "x0-prediction" target. For k = 0 it samples the same law (at a masked position
    q(m | e) does not depend on e; a visible position never changes), but for k > 0 it counts the
    position's own token twice, so sampling with it stays biased however many steps are taken.

    q(z | x) = α_t·[z = x] + (1 − α_t)·r(z) (`MixedKernel.marginal_probs`); p_θ(m) = 0. Callable
    as a `Denoiser` (log-probabilities, t → α_t by `schedule`) for `generate(..., cache=False)`.
    """

    def __init__(
        self,
        data: EnumerableData,
        kernel: MixedKernel,
        schedule: Schedule,
        leave_one_out: bool = True,
    ):
        room = kernel.vocab_size if kernel.mask_id is None else kernel.mask_id
        if data.num_tokens > room:
            raise ValueError(
                f"data uses ids 0..{data.num_tokens - 1}; the kernel's data ids are "
                f"0..{room - 1} (V={kernel.vocab_size}, mask_id={kernel.mask_id})"
            )
        self.data, self.kernel, self.schedule = data, kernel, schedule
        self.leave_one_out = leave_one_out
        v = kernel.vocab_size
        self._onehot = torch.nn.functional.one_hot(data.sequences, v).double()  # (N, L, V)
        self._clean = torch.eye(data.num_tokens, v, dtype=torch.float64)  # (D, V)

    def log_likelihoods(self, z: Tensor, alpha: Tensor) -> Tensor:
        """log q(z^l | x_n^l) for states z (B, L) at α_t (B,) and every sequence n: (B, N, L)."""
        q = self.kernel.marginal_probs(self._clean.expand(z.shape[0], -1, -1), alpha.double())
        qz = q.gather(-1, z.unsqueeze(1).expand(-1, q.shape[1], -1))  # (B, D, L): q(z^l | d)
        seqs = self.data.sequences  # (N, L)
        return qz.log()[:, seqs, torch.arange(seqs.shape[1]).expand_as(seqs)]

    def probs(self, z: Tensor, alpha: Tensor) -> Tensor:
        """Oracle p_θ (B, L, V) float64 for states z (B, L) at α_t (B,)."""
        per = self.log_likelihoods(z, alpha)  # (B, N, L)
        if self.leave_one_out:  # Σ_{j≠l} as prefix + suffix sums: no (−inf) − (−inf)
            zero = torch.zeros_like(per[..., :1])
            before = torch.cat([zero, per[..., :-1].cumsum(-1)], -1)
            after = torch.cat([per[..., 1:].flip(-1).cumsum(-1).flip(-1), zero], -1)
            evidence = before + after
        else:
            evidence = per.sum(-1, keepdim=True).expand_as(per)
        weights = torch.softmax(evidence + self.data.probs.log().view(1, -1, 1), dim=1)
        return torch.bmm(weights.permute(2, 0, 1), self._onehot.transpose(0, 1)).transpose(0, 1)

    def __call__(self, z_t: Tensor, t: Tensor, attention_mask=None, cond=None) -> Tensor:
        return self.probs(z_t, self.schedule.alpha(t.double())).clamp_min(1e-300).log()


def step_matrix(
    kernel: MixedKernel, oracle: OracleDenoiser, states: Tensor, alpha_t: float, alpha_s: float
) -> Tensor:
    """M[z, z'] = Π_l p_θ(z_s^l = z'^l | z_t = z), (S, S) over `states` = all_sequences(V, L)."""
    n = states.shape[0]
    a_t = torch.full((n,), alpha_t, dtype=torch.float64)
    a_s = torch.full((n,), alpha_s, dtype=torch.float64)
    post = kernel.posterior_probs(oracle.probs(states, a_t), states, a_t, a_s)  # (S, L, V)
    m = post[:, 0]
    for l in range(1, states.shape[1]):
        m = (m.unsqueeze(-1) * post[:, l].unsqueeze(1)).reshape(n, -1)
    return m


def exact_output_law(oracle: OracleDenoiser, steps: int, grid: TimeGrid = PAPER_GRID) -> Tensor:
    """p_T(x) (N,): the law of `generate(oracle, ..., sampler=Ancestral(), final=AncestralFinal(),
    grid=grid, cache=False)`, propagated exactly from the prior r^{⊗L} through every step."""
    data, kernel, schedule = oracle.data, oracle.kernel, oracle.schedule
    length = data.sequences.shape[1]
    states = all_sequences(kernel.vocab_size, length)
    law = kernel.prior_probs(torch.float64)[states].prod(-1)  # (S,)
    alphas = schedule.alpha(grid.times(schedule, steps)).tolist() + [1.0]
    for a_t, a_s in zip(alphas[:-1], alphas[1:], strict=True):
        law = law @ step_matrix(kernel, oracle, states, a_t, a_s)
    clean = (states < data.num_tokens).all(-1)  # no mask, no unused id; order = data.sequences
    leftover = float(law[~clean].sum())
    if leftover > 1e-9:
        raise RuntimeError(
            f"{leftover:.3g} of the mass is not on data sequences after the final step"
        )
    return law[clean]


def divergences(p: Tensor, p_t: Tensor) -> dict:
    """TV(p_T, p) and KL(p ‖ p_T) in nats between two laws over the same N sequences."""
    kl = torch.where(p > 0, p * (p.log() - p_t.clamp_min(1e-300).log()), 0.0).sum()
    return {"tv": 0.5 * float((p - p_t).abs().sum()), "kl_nats": float(kl)}
