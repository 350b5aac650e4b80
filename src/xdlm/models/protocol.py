"""The contract between a backbone and everything else: a denoiser maps a noisy sequence to logits.

A backbone never knows about noise: it sees token ids z_t, an optional time (or any scalar the
caller chooses to condition on), an optional key-padding mask and an optional class label, and
returns unnormalised logits over the vocabulary. Parameterisation (mask/uniform/mixed kernel,
carry-over of unmasked tokens, SUBS, ...) lives in `core/`, not here.

Shapes: B batch, L sequence length, V vocabulary size, D hidden width.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import LongTensor, Tensor, nn


@runtime_checkable
class Denoiser(Protocol):
    """`denoiser(z_t, t, attention_mask=None, cond=None) -> logits (B, L, V)`.

    Args:
        z_t: LongTensor (B, L), noisy token ids in [0, V).
        t: Tensor (B,) diffusion time in [0, 1], or None for time-agnostic backbones
            (a backbone without time conditioning accepts and ignores it).
        attention_mask: BoolTensor (B, L), True = real token, False = padding. Padded keys are
            never attended, so logits at real positions do not depend on padded tokens.
        cond: LongTensor (B,) class ids, or None (unconditional / the "null" class).

    Returns:
        Tensor (B, L, V) unnormalised logits (in the autocast dtype when autocast is on).
    """

    def __call__(
        self,
        z_t: LongTensor,
        t: Tensor | None,
        attention_mask: Tensor | None = None,
        cond: LongTensor | None = None,
    ) -> Tensor: ...


@runtime_checkable
class HiddenDenoiser(Denoiser, Protocol):
    """A denoiser whose logits are one linear map of its final hidden states.

    Guarantees `denoiser(z_t, t, m, c) == output_head(denoiser.hidden(z_t, t, m, c))`, so a fused
    loss can consume hidden states (B, L, D) and `output_head.weight` (V, D) chunk by chunk
    without materialising the (B, L, V) logits.
    """

    output_head: nn.Linear

    def hidden(
        self,
        z_t: LongTensor,
        t: Tensor | None,
        attention_mask: Tensor | None = None,
        cond: LongTensor | None = None,
    ) -> Tensor:
        """Final (normed, modulated) hidden states, Tensor (B, L, D)."""
        ...
