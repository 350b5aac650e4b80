"""The XDLM stationary mixed kernel: forward process, exact posterior, per-step KL and NELBO.

Notation (docs/math.md derives every formula):

    V      number of states (the mask m is one of them unless the kernel is pure UDLM)
    k      uniform share: k = 0 is MDLM (pure masking), k = 1 is UDLM (pure uniform noise)
    r(e)   = k/V + (1 − k)·[e = m]                    the prior / stationary distribution
    f_a(y, e) = a·y(e) + (1 − a)·r(e)                 y a one-hot x or a distribution p_θ
    q(z_t = e | x) = f_{α_t}(x, e),   β = 1 − α

Everything is closed form and O(V) per position: no one-hot of x, no V×V matrix. The only
(B, L, V) tensors are the logits, log p_θ and one elementwise map of it.

(Over 400 lines on purpose: prior, posterior, step KL and NELBO share one class and its
gathered terms; the float32-safe remainders live in `xdlm.core.remainders`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xdlm.core.categorical import without_mask
from xdlm.core.logit_stats import logit_stats
from xdlm.core.remainders import log1p_remainder, mixed_gbar_small


@dataclass(frozen=True)
class PosteriorCoefficients:
    """p_θ(z_s = e | z_t) = scale·p_θ(e) + shift + stay·[e = z_t] + remask·[e = m]; each (B, L)."""

    scale: Tensor
    shift: Tensor
    stay: Tensor
    remask: Tensor


@dataclass(frozen=True)
class MixedKernel:
    """Q_{t|s}(e | d) = α_{t|s}·[e = d] + β_{t|s}·r(e): a share k of uniform noise, 1 − k masking.

    Args:
        vocab_size: V, the number of states the denoiser outputs over (mask included).
        mask_id: m, the mask state; `None` only for pure UDLM (k = 1).
        k: the uniform share in [0, 1].
    """

    vocab_size: int
    mask_id: int | None
    k: float

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {self.vocab_size!r}")
        if not 0.0 <= float(self.k) <= 1.0 or math.isnan(float(self.k)):
            raise ValueError(f"k must be in [0, 1] (0 = MDLM, 1 = UDLM), got k={self.k}")
        if self.mask_id is None and self.k != 1.0:
            raise ValueError(
                f"mask_id=None is only valid for pure uniform noise (k=1), got k={self.k}; "
                "pass the mask token id"
            )
        if self.mask_id is not None and not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id={self.mask_id} must be in [0, vocab_size={self.vocab_size})")

    @classmethod
    def mdlm(cls, vocab_size: int, mask_id: int) -> MixedKernel:
        """Pure masking (k = 0): MDLM."""
        return cls(vocab_size, mask_id, 0.0)

    @classmethod
    def udlm(cls, vocab_size: int) -> MixedKernel:
        """Pure uniform noise (k = 1) over V data states with no mask state: UDLM."""
        return cls(vocab_size, None, 1.0)

    def spec(self) -> dict:
        """JSON-able description; `MixedKernel(**spec)` rebuilds the kernel."""
        return {"vocab_size": self.vocab_size, "mask_id": self.mask_id, "k": float(self.k)}

    # ------------------------------------------------------------------ prior and forward

    def prior_probs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """r(e) = k/V + (1 − k)·[e = m], shape (V,)."""
        r = torch.full((self.vocab_size,), self.k / self.vocab_size, dtype=dtype)
        if self.mask_id is not None:
            r[self.mask_id] += 1.0 - self.k
        return r

    def sample_prior(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """z_1 ~ r: the mask with probability 1 − k, else uniform over all V ids. LongTensor."""
        u = torch.rand(shape, generator=generator, device=device)
        j = torch.randint(self.vocab_size, shape, generator=generator, device=device)
        if self.mask_id is None:
            return j
        return torch.where(u < self.k, j, torch.full_like(j, self.mask_id))

    def marginal_probs(self, x0_probs: Tensor, alpha: Tensor) -> Tensor:
        """q(z_t | x) = f_{α_t}(y, ·) = α·y + (1 − α)·r for y = x0_probs (B, ..., V), α (B,)."""
        self._check_vocab(x0_probs.shape[-1], "x0_probs")
        a = _expand(alpha, x0_probs.dim())
        return a * x0_probs + (1.0 - a) * self.prior_probs(x0_probs.dtype).to(x0_probs.device)

    def sample_marginal(
        self, x0: Tensor, alpha: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Forward process z_t ~ q(· | x0) for x0 (B, L), α (B,) -> (B, L).

        Per position: u ~ U[0, 1), j ~ U{0..V−1}; keep x if u < α; emit j if α ≤ u < α + kβ
        (j may be m or x itself); otherwise emit m.
        """
        a = _expand(alpha, x0.dim()).to(x0.device)
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        j = torch.randint(self.vocab_size, x0.shape, generator=generator, device=x0.device)
        z = torch.where(u < a + self.k * (1.0 - a), j, self._mask_like(x0))
        return torch.where(u < a, x0, z)

    # ------------------------------------------------------------------ reverse step

    def posterior_probs(
        self, x0_probs: Tensor, z_t: Tensor, alpha_t: Tensor, alpha_s: Tensor
    ) -> Tensor:
        """p_θ(z_s = e | z_t) ∝ Q_{t|s}(z_t | e)·f_{α_s}(p_θ, e): Bayes with x replaced by p_θ.

        Closed form, (B, L, V) -> (B, L, V); the normaliser is f_{α_t}(p_θ, z_t) (docs/math.md §3).

        `x0_probs` is p_θ (B, L, V) with p_θ(m) = 0; α_s ≥ α_t, both (B,). α_s = 1 is the
        final noise-removal step. Masked z = m:

            p(e) = (α_s − α_t)·p_θ(e)/β_t + k·β_{t|s}·β_s/(V·β_t)       e ≠ m
            p(m) = (β_s/β_t)·[1 − k·β_{t|s}·(V − 1)/V]

        Visible z = j, F = V·α_t·p_θ(j) + k·β_t:

            p(e) = k·β_{t|s}·(V·α_s·p_θ(e) + k·β_s)/(V·F)                e ∉ {j, m}
            p(j) = (same) + 1 − k·β_{t|s}/F,    p(m) = k·β_{t|s}·β_s·(k/V + 1 − k)/F

        Written as  a·p_θ + c  plus a "stay" mass at z and a "re-mask" mass at m.
        """
        self.check_posterior_args(x0_probs, z_t, alpha_t, alpha_s)
        p = x0_probs.to(torch.promote_types(x0_probs.dtype, torch.float32))
        c = self.posterior_coefficients(
            p.gather(-1, z_t.unsqueeze(-1)).squeeze(-1), z_t, alpha_t, alpha_s
        )
        out = c.scale.unsqueeze(-1) * p + c.shift.unsqueeze(-1)
        out.scatter_add_(-1, z_t.unsqueeze(-1), c.stay.unsqueeze(-1))
        if self.mask_id is not None:
            out[..., self.mask_id] += c.remask
        return out

    def posterior_coefficients(
        self, p_z: Tensor, z_t: Tensor, alpha_t: Tensor, alpha_s: Tensor
    ) -> PosteriorCoefficients:
        """Per-position scalars of `posterior_probs`: p = scale·p_θ + shift + stay·δ_z + remask·δ_m.

        p_z = p_θ(z_t) (B, L) (float32+), z_t (B, L), α_t, α_s (B,) -> four (B, L) tensors.
        Masked z: scale = (α_s − α_t)/β_t, shift = k·β_{t|s}·β_s/(V·β_t),
        stay = (β_s/β_t)·(1 − k·β_{t|s}), remask = 0. Visible z, κ = k·β_{t|s}/F:
        scale = κ·α_s, shift = κ·k·β_s/V, stay = 1 − κ, remask = κ·β_s·(1 − k).
        """
        V, k = self.vocab_size, self.k
        at, as_ = (_expand(a, p_z.dim()).to(p_z) for a in (alpha_t, alpha_s))  # (B, 1)
        bt, bs = 1.0 - at, 1.0 - as_
        b_ts = (as_ - at) / as_  # β_{t|s}
        masked = self._is_mask(z_t)
        # κ = k·β_{t|s}/F at visible positions (0 when k = 0: a visible token always stays).
        kappa = (k * b_ts / (V * at * p_z + k * bt)) if k > 0 else torch.zeros_like(p_z)
        return PosteriorCoefficients(
            scale=torch.where(masked, (as_ - at) / bt, kappa * as_),
            shift=torch.where(masked, k * b_ts * bs / (V * bt), kappa * k * bs / V),
            stay=torch.where(masked, (bs / bt) * (1.0 - k * b_ts), 1.0 - kappa),
            remask=torch.where(masked, torch.zeros_like(p_z), kappa * bs * (1.0 - k)),
        )

    # ------------------------------------------------------------------ losses

    def log_probs(self, logits: Tensor) -> Tensor:
        """log p_θ (B, L, V): log_softmax, mask logit at −inf (float32+, input untouched)."""
        self._check_vocab(logits.shape[-1], "logits")
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return torch.log_softmax(without_mask(logits, self.mask_id), dim=-1, dtype=dtype)

    def nelbo(
        self, logits: Tensor, x0: Tensor, z_t: Tensor, alpha: Tensor, dalpha: Tensor
    ) -> Tensor:
        """Continuous-time NELBO integrand ℓ_t(x, z) in nats, (B, L, V) logits -> (B, L).

            ℓ = (−α')·ρ_t(z)·{ ([z = x] − p_θ(z))/f_α(p_θ, z)
                               − (1/α)·[log f_α(x, z) − log f_α(p_θ, z)]
                               + [log f_α(x, x) − log f_α(p_θ, x)] + (k·β/α)·ḡ }

        with ρ_t(z) = r(z)/f_α(x, z) and ḡ = (1/V)·Σ_{e≠m} [log f_α(x, e) − log f_α(p_θ, e)].
        k = 0 uses MDLM's exact form (−α')/(1 − α)·(−log p_θ(x)) at masked positions, 0 elsewhere.
        Evaluated in an exact log1p form that keeps float32 accurate down to α = 1e-5 and at
        α = 1 (docs/math.md §5.3.1).
        """
        self._check_pair(logits, x0, z_t, alpha, "alpha")
        if dalpha.shape != alpha.shape:
            raise ValueError(
                f"dalpha shape {tuple(dalpha.shape)} != alpha shape {tuple(alpha.shape)}"
            )
        return self._nelbo(logits, x0, z_t, _expand(alpha, 2), _expand(dalpha, 2))

    def has_small_lambda(self, alpha: Tensor) -> bool:
        """Whether some α has λ = V·α/(k·β) < 1, where ḡ needs the cancellation-free path
        (α < k/(V + k); never at k = 0). One host sync on an accelerator."""
        return self.k > 0 and bool((alpha < self.k / (self.vocab_size + self.k)).any())

    def _nelbo(self, logits: Tensor, x0: Tensor, z_t: Tensor, alpha: Tensor, dalpha: Tensor):
        """ℓ for logits (..., V), x0, z_t (...) and α, α' broadcastable to x0.

        Evaluated without cancellation (docs/math.md, "float32 at small α"): with
        d = [z = x] − p_θ(z), u_z = α·d/f_α(p_θ, z), u_x = α·(1 − p_θ(x))/f_α(p_θ, x),

            ℓ = (−α')·ρ_t(z)·{ ψ(u_z)/α + log1p(u_x) + (k·β/α)·ḡ },   ψ(u) = u − log1p(u),

        the gathered (...) terms in float64. α = 1 (t = 0) is the exact limit: z = x there, the
        ḡ term vanishes and k = 0 gives 0 (finite gradients).
        """
        dtype = torch.promote_types(logits.dtype, torch.float32)
        a = alpha.to(torch.float64).expand(x0.shape)
        w = -dalpha.to(torch.float64).expand(x0.shape)
        c = self.gbar_offset(a) if self.k > 0 else None  # log λ, λ = V·α/(k·β)
        lp_x, lp_z, sp = logit_stats(
            logits, x0, z_t, None if c is None else c.to(dtype), self.mask_id
        )
        v_gbar = None
        if c is not None:
            small = self.has_small_lambda(a)  # one host sync per call on an accelerator
            v_gbar = self._v_gbar(logits, sp, c) if small else F.softplus(c) - sp.double()
        return self.nelbo_from_stats(lp_x, lp_z, v_gbar, x0, z_t, a, w).to(dtype)

    def gbar_offset(self, a: Tensor) -> Tensor:
        """c = log λ = log(V·α/(k·β)) (float64); α → 0.5 where β = 0 (ḡ's factor is 0 there)."""
        return _Gterms.offset(self, torch.where(a < 1.0, a, torch.full_like(a, 0.5)))

    def nelbo_from_stats(
        self, lp_x: Tensor, lp_z: Tensor, v_gbar: Tensor | None, x0: Tensor, z_t: Tensor, a, w
    ) -> Tensor:
        """ℓ (float64) from its row statistics: lp_x = log p_θ(x), lp_z = log p_θ(z) and V·ḡ
        (`_v_gbar`; None when k = 0); a = α_t and w = −α'_t (float64), all shaped like x0.

        ℓ depends on the logits only through these three numbers per position, which is what
        lets the fused loss (`core/fused_chunk.py`) differentiate it row by row in closed form.
        """
        b = 1.0 - a
        if self.k == 0.0:
            weight = w / torch.where(b > 0, b, torch.ones_like(b))  # α = 1: nothing is masked
            return torch.where(self._is_mask(z_t), weight * -lp_x.double(), torch.zeros_like(b))
        open_ = b > 0
        a_g = torch.where(open_, a, torch.full_like(a, 0.5))  # finite ḡ where β = 0
        V, k = self.vocab_size, self.k
        p_x, p_z = lp_x.double().exp(), lp_z.double().exp()
        is_x = (z_t == x0).double()
        # r(z) built in a's float64 (torch.where of two Python floats would round to float32)
        r_z = torch.full_like(a, k / V).masked_fill(self._is_mask(z_t), k / V + 1.0 - k)
        u_z = a * (is_x - p_z) / (a * p_z + b * r_z)
        u_x = a * (1.0 - p_x) / (a * p_x + b * (k / V))
        g_term = torch.where(open_, k * (1.0 - a_g) / a_g * v_gbar / V, torch.zeros_like(a))
        inner = log1p_remainder(u_z) / a + torch.log1p(u_x) + g_term
        rho = r_z / (a * is_x + b * r_z)
        return w * rho * inner

    def _v_gbar(self, logits: Tensor, sp: Tensor, c: Tensor) -> Tensor:
        """V·ḡ_α (...) in float64: softplus(c) − S where λ = e^c ≥ 1, and the cancellation-free
        `mixed_gbar_small` on the (few) rows with λ < 1, recomputing their log p_θ."""
        out = F.softplus(c) - sp.double()
        rows = (c < 0).nonzero(as_tuple=True)
        if rows[0].numel() == 0:
            return out
        logp = torch.log_softmax(without_mask(logits[rows], self.mask_id), -1, dtype=torch.float64)
        return out.index_put(rows, mixed_gbar_small(logp, c[rows].exp()))

    def step_kl(
        self, logits: Tensor, x0: Tensor, z_t: Tensor, alpha_t: Tensor, alpha_s: Tensor
    ) -> Tensor:
        """KL(q(z_s | z_t, x) ‖ p_θ(z_s | z_t)) in nats for one reverse step t -> s. (B, L).

            KL = A·g_s(z) − g_t(z) + (α_s − α_t)·ρ_t(z)·[g_s(x) + (k·β_s/α_s)·ḡ_s],
            A = 1 − (α_s − α_t)·ρ_t(z)/α_s,   g_a(e) = log f_a(x, e) − log f_a(p_θ, e).

        Evaluated as (g_s − g_t)(z) − (α_s − α_t)·ρ_t(z)·g_s(z)/α_s + ..., with g_s − g_t from
        log1p so the result stays accurate as α_s → α_t. α_s = 1 gives the reconstruction
        term −log p_θ(z_s = x | z_t).
        """
        self._check_pair(logits, x0, z_t, alpha_t, "alpha_t")
        self._check_alphas(alpha_t, alpha_s)
        logp = self.log_probs(logits)
        lp_x = logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        lp_z = logp.gather(-1, z_t.unsqueeze(-1)).squeeze(-1)
        at, as_ = (_expand(a, 2).to(lp_x) for a in (alpha_t, alpha_s))
        final = as_ >= 1.0
        as_safe = torch.where(final, torch.full_like(as_, 0.5), as_)
        delta = as_safe - at
        t, s = (
            _Gterms(self, _softplus_sum(self, logp, a), lp_x, lp_z, x0, z_t, a)
            for a in (at, as_safe)
        )
        r_z = t.log_r_z.exp()
        dg = torch.log1p(delta * (t.is_x.to(lp_x) - r_z) * torch.exp(-t.log_fx_z)) - torch.log1p(
            delta * (lp_z.exp() - r_z) * torch.exp(-t.log_fp_z)
        )
        g_s_z = s.log_fx_z - s.log_fp_z
        g_s_x = s.log_fx_x - s.log_fp_x
        tail = g_s_x + self.k * (1.0 - as_safe) / as_safe * s.gbar if self.k > 0 else g_s_x
        kl = dg + delta * t.rho * (tail - g_s_z / as_safe)
        if self.k == 0.0:  # visible tokens carry over; avoid 0·∞ where p_θ underflows
            kl = torch.where(self._is_mask(z_t), kl, torch.zeros_like(kl))
        return torch.where(final, self._reconstruction_nll(lp_x, lp_z, x0, z_t, at), kl)

    def _reconstruction_nll(
        self, lp_x: Tensor, lp_z: Tensor, x0: Tensor, z_t: Tensor, at: Tensor
    ) -> Tensor:
        """−log p_θ(z_0 = x | z_t) for the final step α_s = 1, (B, L).

        Masked z: p_θ(x). Visible z = j: p(x) = (V·α_t·[x = j] + k·β_t)·p_θ(x)/F.
        """
        if self.k == 0.0:
            return torch.where(self._is_mask(z_t), -lp_x, torch.zeros_like(lp_x))
        V, k, bt = self.vocab_size, self.k, 1.0 - at
        log_f = torch.logaddexp(torch.log(V * at) + lp_z, torch.log(k * bt))
        log_num = torch.log(V * at * (x0 == z_t).to(at) + k * bt) + lp_x
        return torch.where(self._is_mask(z_t), -lp_x, log_f - log_num)

    # ------------------------------------------------------------------ helpers

    def _is_mask(self, z: Tensor) -> Tensor:
        if self.mask_id is None:
            return torch.zeros_like(z, dtype=torch.bool)
        return z == self.mask_id

    def _mask_like(self, x: Tensor) -> Tensor:
        # Pure UDLM has no mask branch (its probability (1 − k)·β is 0); any id works there.
        return torch.full_like(x, self.mask_id if self.mask_id is not None else 0)

    def _check_vocab(self, v: int, name: str) -> None:
        if v != self.vocab_size:
            raise ValueError(
                f"{name} has {v} states in its last dim but the kernel has "
                f"vocab_size={self.vocab_size}; build the kernel with V={v}"
            )

    def _check_pair(
        self, logits: Tensor, x0: Tensor, z_t: Tensor, alpha: Tensor, name: str
    ) -> None:
        self._check_vocab(logits.shape[-1], "logits")
        if x0.shape != z_t.shape or logits.shape[:-1] != x0.shape:
            raise ValueError(
                f"shape mismatch: logits {tuple(logits.shape)}, x0 {tuple(x0.shape)}, "
                f"z_t {tuple(z_t.shape)}; expected (B, L, V), (B, L), (B, L)"
            )
        if alpha.shape != (x0.shape[0],):
            raise ValueError(
                f"{name} must have shape (B,)=({x0.shape[0]},), got {tuple(alpha.shape)}"
            )

    def _check_alphas(self, alpha_t: Tensor, alpha_s: Tensor) -> None:
        if alpha_s.shape != alpha_t.shape:
            raise ValueError(
                f"alpha_s shape {tuple(alpha_s.shape)} != alpha_t {tuple(alpha_t.shape)}"
            )
        if bool((alpha_s < alpha_t).any()):
            bad = (alpha_s - alpha_t).min().item()
            raise ValueError(
                f"need alpha_s >= alpha_t (s < t is less noisy); min(alpha_s - alpha_t)"
                f"={bad:.3g}; swap the two times"
            )

    def check_posterior_args(
        self, x0_probs: Tensor, z_t: Tensor, alpha_t: Tensor, alpha_s: Tensor
    ) -> None:
        """ValueError unless p_θ (B, L, V), z_t (B, L), α_t, α_s (B,) with α_s ≥ α_t fit."""
        self._check_vocab(x0_probs.shape[-1], "x0_probs")
        if x0_probs.shape[:-1] != z_t.shape:
            raise ValueError(
                f"x0_probs {tuple(x0_probs.shape)} does not match z_t "
                f"{tuple(z_t.shape)}; expected (B, L, V) and (B, L)"
            )
        if alpha_t.shape != (z_t.shape[0],):
            raise ValueError(
                f"alpha_t must have shape (B,)=({z_t.shape[0]},), got {tuple(alpha_t.shape)}"
            )
        self._check_alphas(alpha_t, alpha_s)


class _Gterms:
    """The gathered log-quantities of the KL/NELBO at one α (all (B, L)).

    log f_α(x, z), log f_α(p_θ, z), log f_α(x, x), log f_α(p_θ, x), log r(z), ρ_α(z) and
    ḡ_α = (1/V)·[softplus(c) − S], S = Σ_e softplus(log p_θ(e) + c), c = log(V·α/(k·β)), which
    is (1/V)·Σ_{e≠m} g_α(e) written without cancelling V large logs. `sp` is S (None if k = 0
    or ḡ is not needed).
    """

    def __init__(
        self,
        kern: MixedKernel,
        sp: Tensor | None,
        lp_x: Tensor,
        lp_z: Tensor,
        x0: Tensor,
        z_t: Tensor,
        a: Tensor,
    ) -> None:
        V, k = kern.vocab_size, kern.k
        b = 1.0 - a
        self.is_x = z_t == x0
        r_z = torch.full_like(lp_x, k / V).masked_fill(kern._is_mask(z_t), k / V + 1.0 - k)
        self.log_r_z = torch.log(r_z)
        self.log_fx_z = torch.log(a * self.is_x.to(lp_x) + b * r_z)
        self.log_fp_z = torch.logaddexp(torch.log(a) + lp_z, torch.log(b) + self.log_r_z)
        self.log_fx_x = torch.log(a + b * k / V)
        self.log_fp_x = torch.logaddexp(torch.log(a) + lp_x, torch.log(b * k / V))
        self.rho = torch.exp(self.log_r_z - self.log_fx_z)
        if k > 0 and sp is not None:
            self.gbar = (F.softplus(self.offset(kern, a)) - sp) / V

    @staticmethod
    def offset(kern: MixedKernel, a: Tensor) -> Tensor:
        """c = log(V·α) − log(k·β), the softplus offset of ḡ_α."""
        return torch.log(kern.vocab_size * a) - torch.log(kern.k * (1.0 - a))


def _softplus_sum(kern: MixedKernel, logp: Tensor, a: Tensor) -> Tensor | None:
    """S = Σ_e softplus(log p_θ(e) + c) for log p_θ (B, L, V), α (B, 1); None when k = 0."""
    return F.softplus(logp + _Gterms.offset(kern, a).unsqueeze(-1)).sum(-1) if kern.k > 0 else None


def _expand(alpha: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims in total, for broadcasting against (B, ...)."""
    alpha = torch.as_tensor(alpha)
    return alpha.reshape(alpha.shape[0], *([1] * (ndim - 1)))
