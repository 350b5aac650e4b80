"""Conditioning for generation: fixed positions (prompt, infilling), semi-AR windows, guidance.

- A prompt prefix and infilling are both a template: a list of token ids with `None` at the
  free positions ("blanks"); positions past the template's end are free too.
- Semi-autoregressive generation splits a long sequence into blocks; block [b, e) is generated
  inside the window [max(0, e − context_len), e), every earlier position fixed.
- Classifier-free guidance combines two denoiser calls in log space.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from xdlm.models.protocol import Denoiser
from xdlm.sampling.steps import Fixed

BLANK = "[BLANK]"


def fixed_from_template(
    template: Sequence[int | None], batch_size: int, seq_len: int, device: str = "cpu"
) -> Fixed:
    """`Fixed` (B, L) from a template: an int fixes its position, `None` leaves it free.

    A prompt prefix is the template `prompt_ids`; infilling puts `None` at the blanks.
    """
    if len(template) > seq_len:
        raise ValueError(
            f"the prompt/template has {len(template)} tokens but seq_len={seq_len}; "
            "raise --seq-len or shorten the text"
        )
    mask = torch.zeros(seq_len, dtype=torch.bool)
    tokens = torch.zeros(seq_len, dtype=torch.long)
    for i, tok in enumerate(template):
        if tok is not None:
            mask[i], tokens[i] = True, int(tok)
    expand = (batch_size, seq_len)
    return Fixed(mask.expand(expand).to(device), tokens.expand(expand).to(device))


def parse_infill(
    text: str, encode: Callable[[str], list[int]], blank_len: int, blank: str = BLANK
) -> list[int | None]:
    """Template from text with blank markers: each `[BLANK]` becomes `blank_len` free positions,
    and `[BLANK:n]` becomes n. The text between markers is encoded piece by piece.

    >>> parse_infill("a [BLANK:2] b", lambda s: [ord(c) for c in s], 3)
    [97, 32, None, None, 32, 98]
    """
    if blank_len < 1:
        raise ValueError(f"blank length must be >= 1, got {blank_len}")
    pattern = re.escape(blank[:-1]) + r"(?::(\d+))?" + re.escape(blank[-1])
    template: list[int | None] = []
    pos = 0
    for match in re.finditer(pattern, text):
        template += encode(text[pos : match.start()]) if match.start() > pos else []
        template += [None] * (int(match.group(1)) if match.group(1) else blank_len)
        pos = match.end()
    if pos == 0:
        raise ValueError(f"--infill text has no {blank} marker; mark each gap with {blank}")
    return template + (encode(text[pos:]) if pos < len(text) else [])


@dataclass(frozen=True)
class Window:
    """Generate columns [begin, end) inside the denoiser window [start, end)."""

    start: int
    begin: int
    end: int


def block_windows(seq_len: int, block_size: int | None, context_len: int | None) -> list[Window]:
    """The semi-AR schedule: one window if `block_size` is None, else blocks of `block_size`,
    each seen with at most `context_len` (the training length) columns of left context."""
    context_len = context_len or seq_len
    if block_size is None:
        if seq_len > context_len:
            raise ValueError(
                f"seq_len={seq_len} exceeds the model's context {context_len}; "
                "pass --block-size for semi-autoregressive generation"
            )
        return [Window(0, 0, seq_len)]
    if not 1 <= block_size <= context_len:
        raise ValueError(f"block_size must be in [1, context_len={context_len}], got {block_size}")
    windows = []
    for begin in range(0, seq_len, block_size):
        end = min(begin + block_size, seq_len)
        windows.append(Window(max(0, end - context_len), begin, end))
    return windows


def guided_logits(
    denoiser: Denoiser, z_t: Tensor, t: Tensor, labels: Tensor | None, scale: float
) -> Tensor:
    """Classifier-free guidance: logits (B, L, V) from 1 denoiser call (w = 0) or 2 (w ≠ 0).

        logits_w = (1 + w)·logits(z_t | c) − w·logits(z_t | ∅)

    with ∅ the null class (`cond=None`, DiT's row `num_classes`). Softmax removes any per-position
    constant, so this equals (1 + w)·log p(·|c) − w·log p(·|∅) after normalisation: guidance in
    log space. w = 0 makes a single conditional call, so it equals unguided sampling exactly.
    """
    cond = denoiser(z_t, t, None, labels)
    if scale == 0.0:
        return cond
    if labels is None:
        raise ValueError("guidance needs class labels; pass --class-label")
    uncond = denoiser(z_t, t, None, None)
    return (1.0 + scale) * cond - scale * uncond
