"""The `xdm` sampler (the authors' LLaDA-XDLM `generate_xdm`) against an independent reference.

`reference_generate_xdm` below is written the way the authors write it (LLaDA's `generate`
plus the XDLM edits): one straightforward loop over the full canvas, per-row `torch.topk`, the
budget as running Python integers, LLaDA's `exp(logits) / (−log U)^τ` Gumbel form. It shares no
code with `xdlm.sampling.xdm`; the model is a deterministic fake whose logits at a position come
from a fixed random table indexed by (position, left neighbour, right neighbour), so revealing a
token changes its neighbours' argmax and edits actually happen.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import LogLinear
from xdlm.sampling import (
    XDM,
    LogitFilter,
    cumulative_edit_budget,
    generate,
    transfer_counts,
)
from xdlm.sampling.steps import Fixed

V, M = 16, 15  # vocabulary with the mask id M
B, P, GEN, STEPS = 3, 6, 48, 8


class HashModel:
    """Logits (B, L, V) = table_left[l, z_{l−1}] + table_right[l, z_{l+1}]; [MASK] never
    predicted (logit −1e9), so the sampler's p_θ(m) = 0 is a no-op and the reference can use
    the raw logits as the authors do."""

    def __init__(
        self, length: int, seed: int = 0, scale: float = 3.0, dtype: torch.dtype = torch.float32
    ):
        g, self.dtype = torch.Generator().manual_seed(seed), dtype
        self.left = scale * torch.randn(length, V, V, generator=g)
        self.right = scale * torch.randn(length, V, V, generator=g)
        self.calls = 0

    def __call__(self, z, t, attention_mask=None, cond=None):
        self.calls += 1
        pos = torch.arange(z.shape[1])
        left = torch.nn.functional.pad(z[:, :-1], (1, 0), value=M)
        right = torch.nn.functional.pad(z[:, 1:], (0, 1), value=M)
        logits = self.left[pos, left] + self.right[pos, right]
        logits[..., M] = -1e9
        return logits.to(self.dtype)


def reference_num_transfer_tokens(block_mask, steps):
    counts = torch.zeros(block_mask.shape[0], steps, dtype=torch.long)
    for j in range(block_mask.shape[0]):
        total = int(block_mask[j].sum())
        for i in range(steps):
            counts[j, i] = total // steps + (1 if i < total % steps else 0)
    return counts


@torch.no_grad()
def reference_generate_xdm(
    model, prompt, gen_length, steps, block_length, k, temperature=0.0,
    remasking="low_confidence", cfg_scale=0.0, generator=None, in_logits_dtype=False,
):  # fmt: skip
    """in_logits_dtype: the authors' precision (softmax and ranking in the model's dtype);
    otherwise p in float64."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), M, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != M
    ratio = Fraction(str(k)) / (1 - Fraction(str(k)))
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        end = start + block_length
        num_transfer = reference_num_transfer_tokens(x[:, start:end] == M, steps)
        revealed, edited = [0] * x.shape[0], [0] * x.shape[0]
        for i in range(steps):
            mask_index = x == M
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = M
                logits, un_logits = torch.chunk(model(torch.cat([x, un_x]), None), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, None)
            if not in_logits_dtype:
                logits = logits.to(torch.float64)
            if temperature > 0.0:
                noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
                gumbel = logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature
                x0 = torch.argmax(gumbel, dim=-1)
            else:
                x0 = torch.argmax(logits, dim=-1)
            p = torch.softmax(logits, dim=-1)
            p_x0 = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            p_x = torch.gather(p, -1, x.unsqueeze(-1)).squeeze(-1)
            if remasking == "random":
                score = torch.rand(x.shape, generator=generator)
            else:
                score = p_x0.clone()
            score[:, end:] = -torch.inf
            confidence = torch.where(mask_index, score, -torch.inf)
            candidate = ~mask_index & (x0 != x) & (p_x0 >= p_x)
            new_x = x.clone()
            for j in range(x.shape[0]):
                _, reveal = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                new_x[j, reveal] = x0[j, reveal]
                revealed[j] += int(num_transfer[j, i])
                budget = 0 if i == 0 else revealed[j] * ratio.numerator // ratio.denominator
                n_edit = min(budget - edited[j], int(candidate[j].sum()))
                if n_edit > 0:
                    _, edit = torch.topk(torch.where(candidate[j], p_x0[j], -torch.inf), n_edit)
                    new_x[j, edit] = x0[j, edit]
                    edited[j] += n_edit
            x = new_x
    return x


def _prompt() -> torch.Tensor:
    return torch.randint(M, (B, P), generator=torch.Generator().manual_seed(7))


def _fixed(prompt: torch.Tensor) -> Fixed:
    mask = torch.zeros(B, P + GEN, dtype=torch.bool)
    mask[:, :P] = True
    tokens = torch.zeros(B, P + GEN, dtype=torch.long)
    tokens[:, :P] = prompt
    return Fixed(mask, tokens)


def _run(k, blocks, record=False, seed=0, dtype=torch.float32, **xdm):
    prompt = _prompt()
    out = generate(
        HashModel(P + GEN, dtype=dtype), MixedKernel(V, M, k), LogLinear(), batch_size=B,
        seq_len=P + GEN, steps=STEPS, generator=torch.Generator().manual_seed(seed),
        sampler=XDM(**xdm), fixed=_fixed(prompt), block_size=GEN // blocks, record=record,
    )  # fmt: skip
    return prompt, out


@pytest.mark.parametrize("rank_dtype", ["logits", "float64"])
@pytest.mark.parametrize("blocks", [1, 4])
@pytest.mark.parametrize("k", [0.0, 0.1, 0.5])
def test_equals_the_reference_token_for_token(k, blocks, rank_dtype):
    prompt, out = _run(k, blocks, record=True, rank_dtype=rank_dtype)
    ref = reference_generate_xdm(HashModel(P + GEN), prompt, GEN, STEPS, GEN // blocks, k)
    assert torch.equal(out.tokens, ref)
    assert out.nfe == STEPS and not (out.tokens == M).any()
    counts = out.trajectory.counts()
    assert int(counts.remasked.sum()) == 0
    edits = int(counts.revised.sum())
    assert edits == 0 if k == 0.0 else edits > 0  # the fake model makes edits happen


@pytest.mark.parametrize(
    "xdm,blocks,k",
    [
        (dict(temperature=0.8), 1, 0.1),
        (dict(temperature=4.0), 1, 0.5),  # flat draws: x̂ often less likely than z
        (dict(temperature=0.5, remasking="random"), 2, 0.1),
        (dict(cfg_scale=0.5), 4, 0.1),
        (dict(temperature=1.0, remasking="random", cfg_scale=1.5), 2, 0.5),
    ],
)
def test_sampling_options_equal_the_reference(xdm, blocks, k):
    prompt, out = _run(k, blocks, seed=3, **xdm)
    gen = torch.Generator().manual_seed(3)
    ref = reference_generate_xdm(
        HashModel(P + GEN), prompt, GEN, STEPS, GEN // blocks, k, generator=gen, **xdm
    )
    assert torch.equal(out.tokens, ref)
    assert out.nfe == STEPS * (2 if xdm.get("cfg_scale") else 1)


BF16_SETTINGS = [(k, blocks, seed) for k in (0.1, 0.5) for blocks in (1, 4) for seed in (0, 1, 2)]


def _bf16_case(k, blocks, seed, **xdm):
    """(ours, the reference ranking in bf16, the reference ranking in float64) on bf16 logits."""
    prompt = torch.randint(M, (B, P), generator=torch.Generator().manual_seed(seed))
    model = HashModel(P + GEN, seed=seed, dtype=torch.bfloat16)
    out = generate(
        model, MixedKernel(V, M, k), LogLinear(), batch_size=B, seq_len=P + GEN, steps=STEPS,
        generator=None, sampler=XDM(**xdm), fixed=_fixed(prompt), block_size=GEN // blocks,
    )  # fmt: skip
    refs = [
        reference_generate_xdm(model, prompt, GEN, STEPS, GEN // blocks, k, in_logits_dtype=bf16)
        for bf16 in (True, False)
    ]
    return out.tokens, *refs


@pytest.mark.parametrize("k,blocks,seed", BF16_SETTINGS)
def test_bf16_logits_rank_as_the_authors_by_default(k, blocks, seed):
    """bf16 probabilities tie at the selection boundary; the default rank_dtype ("logits")
    breaks the ties as `torch.topk` on the bf16 values does, as the authors' code."""
    ours, faithful, _ = _bf16_case(k, blocks, seed)
    assert torch.equal(ours, faithful)


def test_bf16_ties_decide_the_outcome():
    """The float64 ranking (ties by position) equals the float64 reference and differs from the
    authors' bf16 ranking in some of the settings: the bf16 test above has something to test."""
    differing = 0
    for k, blocks, seed in BF16_SETTINGS:
        ours, faithful, precise = _bf16_case(k, blocks, seed, rank_dtype="float64")
        assert torch.equal(ours, precise)
        differing += int(not torch.equal(precise, faithful))
    assert differing > 0


def test_edits_stay_within_the_cumulative_budget_and_reach_the_prompt():
    _, out = _run(0.5, 1, record=True)
    counts = out.trajectory.counts()  # (S, B)
    budget = cumulative_edit_budget(0.5, counts.revealed.T)  # (B, S)
    assert bool((counts.revised.T.cumsum(-1) <= budget).all())
    changed = out.trajectory.states[-1, :, :P] != out.trajectory.states[0, :, :P]
    assert bool(changed.any())  # the authors' algorithm edits the prompt
    _, kept = _run(0.5, 1, protect_prompt=True)
    assert torch.equal(kept.tokens[:, :P], _prompt())


def test_budget_schedule_hand_computed():
    n = torch.tensor([[1, 4, 8, 9, 16]])
    assert cumulative_edit_budget(0.1, n).tolist() == [[0, 0, 1, 2, 4]]  # ⌊[1,5,13,22,38]/9⌋
    assert cumulative_edit_budget(0.5, n).tolist() == [[0, 5, 13, 22, 38]]
    assert cumulative_edit_budget(0.0, n).tolist() == [[0, 0, 0, 0, 0]]
    paper = cumulative_edit_budget(0.1, torch.full((1, 32), 8))[0]  # 256 tokens, 32 steps
    assert paper[:4].tolist() == [0, 1, 2, 3] and int(paper[-1]) == 28  # ⌊8(i+1)/9⌋, ⌊256/9⌋
    assert cumulative_edit_budget(0.1, torch.full((1, 3), 9)).tolist() == [[0, 2, 3]]
    with pytest.raises(ValueError, match="k in"):
        cumulative_edit_budget(1.0, n)


def test_transfer_counts_match_llada():
    masked = torch.zeros(2, 12, dtype=torch.bool)
    masked[0, :10], masked[1, :3] = True, True
    assert transfer_counts(masked, 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_never_reveals_the_mask_even_when_the_model_prefers_it():
    def likes_mask(z, t, attention_mask=None, cond=None):
        logits = torch.zeros(*z.shape, V)
        logits[..., M] = 50.0
        return logits

    out = generate(
        likes_mask, MixedKernel(V, M, 0.1), LogLinear(), batch_size=2, seq_len=12, steps=4,
        generator=None, sampler=XDM(),
    )  # fmt: skip
    assert not (out.tokens == M).any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=5), "divides 48"),
        (dict(block_size=6, steps=12), "multiple of 8"),
        (dict(filter=LogitFilter(temperature=0.5)), "LogitFilter"),
    ],
)
def test_errors_name_the_fix(kwargs, match):
    settings = dict(
        batch_size=B, seq_len=P + GEN, steps=STEPS, generator=None, sampler=XDM(),
        fixed=_fixed(_prompt()),
    )  # fmt: skip
    with pytest.raises(ValueError, match=match):
        generate(HashModel(P + GEN), MixedKernel(V, M, 0.1), LogLinear(), **settings | kwargs)
    with pytest.raises(ValueError, match="remasking"):
        XDM(remasking="top")
    with pytest.raises(ValueError, match="rank_dtype"):
        XDM(rank_dtype="bfloat16")
