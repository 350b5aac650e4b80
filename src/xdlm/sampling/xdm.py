"""The authors' LLaDA-XDLM sampler (`generate_xdm`, MzeroMiko/LLaDA-XDLM): the `xdm` sampler.

LLaDA's confidence-ordered unmasking on the full-length canvas, plus argmax edits of visible
tokens under a cumulative budget. The canvas z (B, L) holds the prompt in its first P columns
and [MASK] elsewhere (fixed infilling tokens stay where the template puts them):

- Blocks: the L − P generated columns are split into blocks of `block_size` (one block when
  None) and the T steps evenly over the blocks (T_b = T / #blocks each). Every step calls the
  denoiser on the WHOLE canvas: later blocks are still [MASK] and visible to attention.
- x̂ = argmax of the logits (τ = 0, the paper's setting) or of logits − τ·log(−log U), U ~ U(0, 1)
  in float64 (LLaDA's Gumbel-max: a draw from softmax(logits/τ)); x̂ is never [MASK].
- p_θ and the ranking (`rank_dtype`): "logits" (default, the authors'): p_θ = softmax(logits)
  in the logits' own dtype (bf16 for LLaDA) over all V, and each row's positions picked with
  `torch.topk`, so ties between equal bf16 probabilities at the selection boundary fall as in
  the authors' code on the same device; "float64": p_θ in float64 with p_θ(m) = 0, ties broken
  by position (device-independent, fewer ties).
- Reveal (LLaDA's `get_num_transfer_tokens`): with M the block's masked positions at its start,
  step i reveals n_i = M // T_b (+1 in the first M % T_b steps) of the block's masked positions,
  those with the highest c = p_θ(x̂) ('low_confidence'; 'random': c ~ U(0, 1) in float32).
- Edit: E_i = ⌊k/(1−k)·Σ_{j≤i} n_j⌋ for i ≥ 1 and E_0 = 0 (steps i = 0 … T_b − 1 of a block);
  step i may make E_i − (edits already made in this block) edits, so unused budget carries over.
  Candidates: visible positions (the prompt and earlier blocks included) with x̂ ≠ z and
  p_θ(x̂) ≥ p_θ(z); the ones with the largest p_θ(x̂) become x̂.
- CFG (LLaDA's unsupervised guidance, w = `cfg_scale` > 0): logits = u + (w + 1)·(c − u), u the
  logits of the canvas with the prompt (every initially visible position) set to [MASK].

Deliberate differences from the authors' code, none of which changes a result with LLaDA: x̂
avoids [MASK] (LLaDA never predicts it; our own backbones' [MASK] logit is untrained); the
Gumbel-max is computed in log space (same argmax, no exp overflow); E_i uses k's decimal value
exactly (integer arithmetic, no float floor at integers). `protect_prompt=True` (not the
authors') keeps the prompt/fixed tokens out of the edits.

Cost per step outside the denoiser (B, L, V): one `max(-1)` (x̂) and one softmax written into a
buffer reused across steps, then (B, L) work; "float64" adds a float64 copy of one sequence's
(L, V) logits at a time (benchmarks/xdm_speed.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from xdlm.core.categorical import without_mask
from xdlm.core.kernel import MixedKernel
from xdlm.models.protocol import Denoiser
from xdlm.sampling.confidence import top_n, uniform_to_mask_ratio
from xdlm.sampling.steps import Fixed
from xdlm.sampling.trajectory import SampleOutput, Trajectory

REMASKING = ("low_confidence", "random")
RANK_DTYPES = ("logits", "float64")


def transfer_counts(masked: Tensor, steps: int) -> Tensor:
    """n (B, T) long: reveals per step for the masked positions (B, L_b) of a block.

    M // T per step plus one in the first M % T steps (M = masked count of the row), so the
    T counts sum to M (LLaDA's `get_num_transfer_tokens`).
    """
    total = masked.sum(-1, keepdim=True)
    step = torch.arange(steps, device=masked.device)
    return total // steps + (step < total % steps).long()


def cumulative_edit_budget(k: float, n: Tensor) -> Tensor:
    """E (B, T) long: E_i = ⌊k/(1−k)·Σ_{j≤i} n_j⌋ for i ≥ 1, E_0 = 0, from n (B, T).

    The edits allowed up to and including step i of a block; k's decimal value is used exactly,
    e.g. k = 0.1 and n = [1, 4, 8, 9, 16] give E = [0, 0, 1, 2, 4].
    """
    if not 0.0 <= k < 1.0:
        raise ValueError(f"the xdm edit budget needs k in [0, 1) (a mask state), got k={k}")
    ratio = uniform_to_mask_ratio(k)
    budget = n.cumsum(-1) * ratio.numerator // ratio.denominator
    budget[..., 0] = 0
    return budget


def prompt_length(fixed: Fixed) -> int:
    """P: the number of leading columns fixed in every row of `fixed` (B, L)."""
    return int(fixed.mask.all(0).long().cumprod(0).sum())


@dataclass(frozen=True)
class XDMStep:
    """z_s (B, L) and which positions were revealed / edited, bool (B, L)."""

    z_s: Tensor
    revealed: Tensor
    edited: Tensor


@dataclass(frozen=True)
class XDM:
    """The faithful LLaDA-XDLM sampler (module docstring); the paper's defaults.

    Args:
        temperature: τ of the Gumbel-max draw of x̂ (0 = greedy argmax, the paper's).
        remasking: reveal order, 'low_confidence' (p_θ(x̂)) or 'random'.
        cfg_scale: LLaDA's unsupervised classifier-free guidance w (0 = off).
        protect_prompt: keep the prompt / fixed tokens out of the edits (ours; the authors'
            code edits them).
        rank_dtype: "logits" (default, the authors'): p_θ = softmax in the logits' own dtype
            over all V (the [MASK] logit included) and per-row `torch.topk`, so bf16 ties at
            the selection boundary are broken exactly as the authors' code breaks them on the
            same device; "float64": p_θ in float64 with p_θ(m) = 0, ties broken by position
            (device-independent).
    """

    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    protect_prompt: bool = False
    rank_dtype: str = "logits"
    uses_final_step: ClassVar[bool] = False  # the loop's final step does not apply

    def __post_init__(self) -> None:
        if self.remasking not in REMASKING:
            raise ValueError(f"xdm remasking must be one of {REMASKING}, got {self.remasking!r}")
        if self.rank_dtype not in RANK_DTYPES:
            raise ValueError(
                f"xdm rank_dtype must be one of {RANK_DTYPES}, got {self.rank_dtype!r}"
            )
        if self.temperature < 0.0 or self.cfg_scale < 0.0:
            raise ValueError(
                f"xdm needs temperature >= 0 and cfg_scale >= 0, got {self.temperature}, "
                f"{self.cfg_scale}"
            )

    def logits(
        self, denoiser: Denoiser, z: Tensor, prompt: Tensor, mask_id: int, labels: Tensor | None
    ) -> Tensor:
        """Logits (B, L, V) for the canvas z (B, L); with CFG the prompt (B, L) is masked in u."""
        if self.cfg_scale == 0.0:
            return denoiser(z, None, None, labels)
        uncond = torch.where(prompt, mask_id, z)
        both = denoiser(torch.cat([z, uncond]), None, None, _twice(labels))
        c, u = both.chunk(2)
        return u + (self.cfg_scale + 1.0) * (c - u)

    def step(
        self,
        logits: Tensor,
        z_t: Tensor,
        mask_id: int,
        block_end: int,
        n_reveal: Tensor,
        n_edit: Tensor,
        editable: Tensor,
        generator: torch.Generator | None,
        scratch: dict[str, Tensor] | None = None,
    ) -> XDMStep:
        """One step on the canvas z_t (B, L): reveal n_reveal (B,) masked positions left of
        `block_end`, edit at most n_edit (B,) `editable` (B, L) visible positions. `scratch`
        keeps the (B, L, V)-sized work buffers from one step to the next (`run` passes one)."""
        scratch = {} if scratch is None else scratch
        x_hat = self._propose(logits, mask_id, generator)
        if self.rank_dtype == "logits":
            p_hat, p_z = _probs_in_dtype(logits, x_hat, z_t, scratch)
            select = _topk_rows
        else:
            p_hat, p_z = _probs_float64(logits, x_hat, z_t, mask_id, scratch)
            select = top_n
        masked = z_t == mask_id
        if self.remasking == "random":
            score = torch.rand(z_t.shape, generator=generator, device=z_t.device)
        else:
            score = p_hat
        in_block = torch.arange(z_t.shape[1], device=z_t.device) < block_end
        reveal = select(torch.where(masked & in_block, score, -math.inf), n_reveal)
        candidate = ~masked & editable & (x_hat != z_t) & (p_hat >= p_z)
        n_edit = torch.minimum(n_edit.clamp(min=0), candidate.sum(-1))
        edit = select(torch.where(candidate, p_hat, -math.inf), n_edit)
        return XDMStep(torch.where(reveal | edit, x_hat, z_t), reveal, edit)

    def _propose(self, logits: Tensor, mask_id: int, generator: torch.Generator | None) -> Tensor:
        """x̂ (B, L), never m: argmax of the logits (B, L, V) (`max(-1)`: the same first-index
        rule as `argmax`, about twice as fast on CPU), or at temperature τ > 0 the Gumbel-max
        draw argmax(logits − τ·log(−log U)) with U (B, L, V) float64, drawn as the authors do."""
        if self.temperature == 0.0:
            x_hat = logits.max(-1).indices
            chose_mask = x_hat == mask_id
            if bool(chose_mask.any()):  # never with LLaDA; then the argmax without [MASK]
                x_hat = torch.where(chose_mask, without_mask(logits, mask_id).argmax(-1), x_hat)
            return x_hat
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
        perturbed = u.log_().neg_().log_().mul_(-self.temperature).add_(logits)
        perturbed[..., mask_id] = -math.inf
        return perturbed.argmax(-1)

    def run(
        self,
        denoiser: Denoiser,
        kernel: MixedKernel,
        *,
        batch_size: int,
        seq_len: int,
        steps: int,
        generator: torch.Generator | None,
        fixed: Fixed | None = None,
        block_size: int | None = None,
        class_labels: Tensor | None = None,
        record: bool = False,
        device: str | torch.device = "cpu",
    ) -> SampleOutput:
        """Sample B sequences of length L with T = `steps` in total (split over the blocks).

        `fixed` (B, L) gives the prompt (its leading fixed columns, P) and any infilling tokens;
        every other position starts as [MASK]."""
        with torch.no_grad():  # inference only (inside, so mutmut mutates the body)
            start, m = time.perf_counter(), kernel.mask_id
            if m is None:
                raise ValueError(
                    "the xdm sampler needs a mask state (k < 1); use 'ancestral' for UDLM"
                )
            z = torch.full((batch_size, seq_len), m, dtype=torch.long, device=device)
            fixed = fixed if fixed is not None else Fixed.none(z)
            z = fixed.pin(z)
            prompt = fixed.mask.to(device)
            editable = ~prompt if self.protect_prompt else torch.ones_like(prompt)
            states, labels, nfe, scratch = [z], [], 0, {}
            for b, block in enumerate(blocks(prompt_length(fixed), seq_len, steps, block_size)):
                n = transfer_counts(z[:, block.begin : block.end] == m, block.steps)
                budget = cumulative_edit_budget(kernel.k, n)
                edits = torch.zeros(batch_size, dtype=torch.long, device=device)
                for i in range(block.steps):
                    logits = self.logits(denoiser, z, prompt, m, class_labels)
                    nfe += 1 if self.cfg_scale == 0.0 else 2
                    allowed = budget[:, i] - edits
                    out = self.step(
                        logits, z, m, block.end, n[:, i], allowed, editable, generator, scratch
                    )
                    z, edits = out.z_s, edits + out.edited.sum(-1)
                    if record:
                        states.append(z)
                        labels.append(f"block {b} step {i + 1}")
            trajectory = Trajectory(torch.stack(states), labels, m) if record else None
            return SampleOutput(z, nfe, trajectory, time.perf_counter() - start)


def _buffer(scratch: dict[str, Tensor], name: str, like: Tensor, shape, dtype) -> Tensor:
    """scratch[name], (re)allocated when its shape or dtype changes (a reused work buffer)."""
    buf = scratch.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != like.device:
        buf = scratch[name] = torch.empty(shape, dtype=dtype, device=like.device)
    return buf


def _probs_in_dtype(
    logits: Tensor, x_hat: Tensor, z: Tensor, scratch: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """p_θ(x̂), p_θ(z) (B, L) in the logits' dtype: `torch.softmax` over all V logits (B, L, V),
    the [MASK] logit included, exactly the values the authors rank (the same kernel, written
    into a reused buffer: no fresh (B, L, V) allocation per step)."""
    p = _buffer(scratch, "p", logits, logits.shape, logits.dtype)
    torch._softmax(logits, -1, False, out=p)
    return p.gather(-1, x_hat.unsqueeze(-1)).squeeze(-1), p.gather(-1, z.unsqueeze(-1)).squeeze(-1)


def _probs_float64(
    logits: Tensor, x_hat: Tensor, z: Tensor, mask_id: int, scratch: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """p_θ(x̂), p_θ(z) (B, L) float64 with p_θ(m) = 0: exp(ℓ_v − max ℓ) / Σ_{v≠m} exp(ℓ_v − max ℓ)
    from the logits ℓ (B, L, V), one sequence at a time in a reused (L, V) float64 buffer."""
    index = torch.stack([x_hat, z], dim=-1)  # (B, L, 2)
    out = torch.empty(index.shape, dtype=torch.float64, device=logits.device)
    work = _buffer(scratch, "float64", logits, logits.shape[1:], torch.float64)
    for b in range(logits.shape[0]):
        work.copy_(logits[b])
        work[:, mask_id] = -math.inf
        top = work.amax(-1, keepdim=True)
        picked = work.gather(-1, index[b]).sub_(top).exp_()
        out[b] = picked / work.sub_(top).exp_().sum(-1, keepdim=True)
    return out[..., 0], out[..., 1]


def _topk_rows(score: Tensor, n: Tensor) -> Tensor:
    """Bool (B, L): in each row b of score (B, L), the n[b] positions `torch.topk` picks, as the
    authors select them (ties broken however topk breaks them on this device)."""
    chosen = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    for b, count in enumerate(n.tolist()):
        chosen[b, torch.topk(score[b], count).indices] = True
    return chosen


@dataclass(frozen=True)
class Block:
    """Generated columns [begin, end) of the canvas, revealed in `steps` steps."""

    begin: int
    end: int
    steps: int


def blocks(prompt_len: int, seq_len: int, steps: int, block_size: int | None) -> list[Block]:
    """The blocks of the generated columns [P, L) (LLaDA's checks: the block size divides L − P,
    the block count divides T)."""
    gen = seq_len - prompt_len
    size = block_size or gen
    if gen == 0:
        return []
    if size < 1 or gen % size:
        raise ValueError(
            f"xdm splits the {gen} generated positions (seq_len - prompt) into blocks of "
            f"block_size={size}: pass a block size that divides {gen}"
        )
    count = gen // size
    if steps < count or steps % count:
        raise ValueError(
            f"xdm splits steps={steps} evenly over {count} blocks: pass a multiple of {count}"
        )
    begins = range(prompt_len, seq_len, size)
    return [Block(begin, begin + size, steps // count) for begin in begins]


def _twice(labels: Tensor | None) -> Tensor | None:
    return None if labels is None else torch.cat([labels, labels])
