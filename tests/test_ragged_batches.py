"""Batches whose rows differ (issue 29): every row is handled on its own terms, not by what any
or every other row of the batch holds. Likelihood over rows of different lengths, sampling
windows fixed in some rows only, XDM's shared prompt length, SFT prompt masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xdlm import MixedKernel, make_schedule
from xdlm.data.loader import Rows
from xdlm.eval.likelihood import sequence_bounds
from xdlm.models.hf_data import sft_masks
from xdlm.sampling import generate
from xdlm.sampling.steps import Fixed
from xdlm.sampling.xdm import prompt_length

V, MASK, L = 9, 8, 10
SCHED = make_schedule("loglinear")


class MaskedToy(nn.Module):
    """logits = A[z_l] + mean over the row's real positions of B[z]: bidirectional, and blind
    to padding like a real denoiser given `attention_mask` (B, L)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = nn.Parameter(torch.randn(V, V, generator=g))
        self.b = nn.Parameter(torch.randn(V, V, generator=g))
        self.calls = 0

    def forward(self, z, t, attention_mask=None, cond=None):
        self.calls += 1
        real = torch.ones_like(z, dtype=torch.bool) if attention_mask is None else attention_mask
        w = real.float() / real.sum(1, keepdim=True)
        return self.a[z] + (w[..., None] * self.b[z]).sum(1, keepdim=True)


LENGTHS = torch.tensor([L, 4, 1])  # a full row, a partial one, a single token


def _ragged(pad_token: int):
    x = torch.randint(0, MASK, (3, L), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(L)[None] < LENGTHS[:, None]
    return torch.where(mask, x, torch.full_like(x, pad_token)), mask


@pytest.mark.parametrize("discrete", [None, 3])
def test_ragged_rows_are_each_scored_on_their_own_length(discrete):
    kern, model = MixedKernel(V, MASK, 0.3), MaskedToy()
    kw = dict(discrete_steps=discrete, seed=5, t_samples=3)
    x, mask = _ragged(pad_token=0)
    ids = torch.arange(3)
    batched = sequence_bounds(model, kern, SCHED, [(ids, Rows(x, mask))], **kw)
    alone = sequence_bounds(
        model, kern, SCHED, [(ids[[i]], Rows(x[[i]], mask[[i]])) for i in range(3)], **kw
    )
    assert torch.equal(batched.tokens, LENGTHS) and torch.equal(alone.tokens, LENGTHS)
    assert torch.allclose(batched.nats, alone.nats, rtol=1e-6)
    other_pads, _ = _ragged(pad_token=7)  # what sits in the padding never counts
    again = sequence_bounds(model, kern, SCHED, [(ids, Rows(other_pads, mask))], **kw)
    assert torch.allclose(again.nats, batched.nats, rtol=1e-6)
    assert bool((batched.nats > 0).all())


def test_a_window_fixed_in_some_rows_is_still_sampled_in_the_others():
    """Block 0 is fixed in row 0 only: row 1 must still be sampled there; block 1 is fixed in
    every row: skipped (no denoiser call)."""
    kern, model = MixedKernel.mdlm(V, MASK), MaskedToy()
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, :4] = True  # block 0 = columns 0..3 (block_size 4)
    mask[:, 4:8] = True  # block 1 in every row
    fixed = Fixed(mask, torch.full((2, L), 3))
    out = generate(
        model, kern, SCHED, batch_size=2, seq_len=L, steps=3, block_size=4,
        generator=torch.Generator().manual_seed(0), fixed=fixed, cache=False,
    )  # fmt: skip
    assert bool((out.tokens != MASK).all())  # every row revealed everywhere
    assert torch.equal(out.tokens[mask], fixed.tokens[mask])
    assert model.calls == 2 * (3 + 1)  # blocks 0 and 2: T steps and the final step each


def test_xdm_prompt_length_counts_columns_fixed_in_every_row():
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :5] = mask[1, :2] = mask[2, :3] = True
    mask[:, 3] = True  # fixed in every row, but after a column that is not
    assert prompt_length(Fixed(mask, torch.zeros(3, 8, dtype=torch.long))) == 2
    full = torch.ones(2, 8, dtype=torch.bool)
    assert prompt_length(Fixed(full, torch.zeros(2, 8, dtype=torch.long))) == 8
    assert prompt_length(Fixed(~full, torch.zeros(2, 8, dtype=torch.long))) == 0


def test_sft_masks_keep_each_rows_own_prompt():
    tokens = torch.zeros(3, 5, dtype=torch.long)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    m = sft_masks(tokens, torch.tensor([0, 2, 4]), real)
    assert m.keep_mask.sum(1).tolist() == [0, 2, 4] and bool(m.keep_mask[2, :4].all())
    assert m.loss_mask.tolist() == [
        [True] * 5,
        [False, False, True, False, False],
        [False] * 5,
    ]
