"""HFDenoiser on tiny random transformers models (offline): bidirectionality, padding, the
HiddenDenoiser contract, tokenizer preparation, SFT masks, fine-tuning, save/load round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hf_fixtures import austen_text, tiny_config, tiny_tokenizer, write_remote_model

from xdlm.core.kernel import MixedKernel
from xdlm.core.objective import Weighting, diffusion_loss
from xdlm.core.schedules import make_schedule
from xdlm.models.hf import HFDenoiser, resolve_kind
from xdlm.models.hf_data import (
    chat_prompt,
    prepare_tokenizer,
    sft_masks,
    tokenize_sft_jsonl,
)
from xdlm.models.protocol import Denoiser, HiddenDenoiser

CASES = [
    ("llama", "sdpa", "decoder"),
    ("llama", "eager", "decoder"),
    ("gpt2", "sdpa", "decoder"),
    ("bert", "sdpa", "encoder"),
    ("modernbert", "sdpa", "encoder"),
]


def _remote(tmp_path) -> HFDenoiser:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        write_remote_model(tmp_path / "llada"), trust_remote_code=True
    )
    return HFDenoiser.from_config(config, trust_remote_code=True)


def _build(case, tmp_path) -> HFDenoiser:
    torch.manual_seed(0)
    if case == "remote":
        return _remote(tmp_path).eval()
    name, attn, _ = case
    return HFDenoiser.from_config(tiny_config(name, attn=attn)).eval()


@pytest.mark.parametrize("case", CASES + ["remote"], ids=str)
def test_bidirectional_and_padding_invariant(case, tmp_path):
    model = _build(case, tmp_path)
    assert isinstance(model, Denoiser) and isinstance(model, HiddenDenoiser)
    if case != "remote":
        assert model.kind == case[2]
    g = torch.Generator().manual_seed(1)
    z = torch.randint(0, 300, (2, 12), generator=g)
    later = z.clone()
    later[:, -1] = (later[:, -1] + 1) % 300
    with torch.no_grad():
        # a later token changes the logits at the first position: attention is not causal
        assert (model(z, None)[:, 0] - model(later, None)[:, 0]).abs().max() > 1e-5
        # padding: real positions ignore whatever sits in padded slots
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[1, 8:] = False
        junk = z.clone()
        junk[1, 8:] = torch.randint(0, 300, (4,), generator=g)
        a, b = model(z, None, mask), model(junk, None, mask)
        torch.testing.assert_close(a[1, :8], b[1, :8])
        torch.testing.assert_close(a[1, :8], model(z[1:, :8], None)[0], atol=1e-5, rtol=1e-4)
        # HiddenDenoiser: logits are output_head(hidden)
        torch.testing.assert_close(model.output_head(model.hidden(z, None, mask)), a)
    assert a.shape == (2, 12, model.vocab_size)
    assert len(model.blocks) == 2


def test_kind_resolution_and_errors():
    assert resolve_kind(tiny_config("llama"), "auto") == "decoder"
    assert resolve_kind(tiny_config("bert"), "auto") == "encoder"
    model = _build(CASES[0], None)
    with pytest.raises(ValueError, match="cond"):
        model(torch.zeros(1, 3, dtype=torch.long), None, cond=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="kind"):
        resolve_kind(tiny_config("llama"), "causal")


def test_prepare_tokenizer_adds_distinct_mask_and_resizes():
    tok = tiny_tokenizer()
    n_before = len(tok)
    ids = prepare_tokenizer(tok)
    assert ids.mask == n_before and len(tok) == n_before + 1
    assert len({ids.mask, ids.pad, ids.bos, ids.eos}) == 4
    assert prepare_tokenizer(tok) == ids  # idempotent
    model = HFDenoiser.from_config(tiny_config("llama", vocab_size=n_before))
    assert model.resize_vocab(len(tok)) == len(tok)
    assert model(torch.tensor([[ids.mask, 5]]), None).shape == (1, 2, len(tok))


def test_chat_prompt_with_and_without_template():
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "Who is Mr. Darcy?"}]
    ids = chat_prompt(tok, messages)
    assert tok.decode(ids) == "<|user|>Who is Mr. Darcy?<eos><|assistant|>"
    tok.chat_template = None
    ids = chat_prompt(tok, messages)
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "Who is Mr. Darcy?"


def test_sft_masks_and_jsonl(tmp_path):
    tok = tiny_tokenizer()
    ids = prepare_tokenizer(tok)
    rows = [{"prompt": "Hello", "response": "Good day, sir."}]
    rows.append(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]}
    )
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    batch = tokenize_sft_jsonl(path, tok, ids, seq_len=24)
    assert batch.tokens.shape == (2, 24) and bool(batch.attention_mask.all())
    p0 = len(chat_prompt(tok, [{"role": "user", "content": "Hello"}]))
    assert batch.prompt_lengths[0] == p0 and batch.tokens[0, -1] == ids.eos
    masks = sft_masks(batch.tokens, batch.prompt_lengths, batch.attention_mask)
    assert masks.keep_mask[0, :p0].all() and not masks.keep_mask[0, p0:].any()
    assert torch.equal(masks.loss_mask, ~masks.keep_mask)
    padded = tokenize_sft_jsonl(path, tok, ids, seq_len=24, pad_with_eos=False)
    m = sft_masks(padded.tokens, padded.prompt_lengths, padded.attention_mask)
    assert not (m.loss_mask & ~padded.attention_mask).any()


def test_sft_loss_leaves_prompt_clean_and_out_of_loss():
    model = _build(CASES[0], None)
    kernel, schedule = MixedKernel(320, 319, 0.1), make_schedule("loglinear")
    x0 = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    masks = sft_masks(x0, torch.tensor([3, 5, 8, 15]))
    t = torch.full((4,), 0.999)  # nearly everything outside the prompt is noised
    out = diffusion_loss(
        model, kernel, schedule, x0, t=t, generator=torch.Generator().manual_seed(0),
        keep_mask=masks.keep_mask, loss_mask=masks.loss_mask, weighting=Weighting.UNIT,
    )  # fmt: skip
    assert torch.equal(out.z_t[masks.keep_mask], x0[masks.keep_mask])
    assert (out.z_t[masks.loss_mask] != x0[masks.loss_mask]).float().mean() > 0.9
    assert bool((out.per_token[masks.keep_mask] == 0).all())
    assert out.tokens == masks.loss_mask.sum()


def test_finetune_loss_falls_on_real_text():
    tok = tiny_tokenizer()
    ids = prepare_tokenizer(tok)
    text = austen_text(6000)
    tokens = torch.tensor(tok(text)["input_ids"][: 8 * 48]).view(8, 48)
    torch.manual_seed(0)
    model = HFDenoiser.from_config(tiny_config("llama", vocab_size=len(tok)))
    kernel, schedule = MixedKernel(len(tok), ids.mask, 0.1), make_schedule("loglinear")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def fixed_loss() -> float:  # same t grid and noise every time
        with torch.no_grad():
            t = torch.linspace(0.05, 0.95, 8)
            gen = torch.Generator().manual_seed(123)
            out = diffusion_loss(model, kernel, schedule, tokens, t=t, generator=gen)
            return (out.nats / out.tokens).item()

    before = fixed_loss()
    for _ in range(25):
        out = diffusion_loss(model, kernel, schedule, tokens, generator=g, weighting=Weighting.UNIT)
        opt.zero_grad()
        (out.nats / out.tokens).backward()
        opt.step()
    assert fixed_loss() < 0.85 * before


@pytest.mark.parametrize("case", [CASES[0], CASES[3], "remote"], ids=str)
def test_save_pretrained_round_trip(case, tmp_path):
    model = _build(case, tmp_path)
    out = model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    back = HFDenoiser.from_pretrained(out, trust_remote_code=case == "remote").eval()
    assert back.kind == model.kind
    z = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(z, None), model(z, None))
    grown = HFDenoiser.from_pretrained(out, trust_remote_code=case == "remote", vocab_size=330)
    assert grown.vocab_size == 330


def test_cpu_hf_recipe_trains(tmp_path):
    """configs/hf_tiny.yaml through the training loop, with a tiny random GPT-2 on disk."""
    from xdlm.config import load_config
    from xdlm.train.loop import train

    HFDenoiser.from_config(tiny_config("gpt2")).save_pretrained(tmp_path / "gpt2")
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "hf_tiny.yaml",
        [
            f"model.hf_name={tmp_path / 'gpt2'}",
            f"data.path={tmp_path / 'data'}",
            "data.tokenizer=bpe",
            "data.tokenizer_source=null",
            "data.tokenizer_vocab_size=400",
            "data.seq_len=32",
            "train.steps=3",
            "train.warmup_steps=1",
            "train.eval_every=3",
            "train.eval_batches=1",
            "train.save_every=3",
            "train.device=cpu",
            "sample.num_samples=1",
            "sample.steps=4",
        ],
    )
    result = train(cfg, tmp_path / "run")
    assert result.step == 3 and result.last_loss is not None and math.isfinite(result.last_loss)
    assert math.isfinite(result.valid["valid_nats_per_token"]) and result.valid["valid_tokens"] > 0
    from xdlm.runs import load_run

    init = HFDenoiser.from_pretrained(tmp_path / "gpt2").state_dict()
    raw = load_run(tmp_path / "run", use_ema=False)
    ema = load_run(tmp_path / "run").model.state_dict()
    assert raw.kernel.k == 0.1 and raw.kernel.mask_id == raw.tokenizer.mask_id
    assert raw.kernel.vocab_size == raw.model.vocab_size
    moved = {  # the vocabulary-sized tensors were resized to the tokenizer: compared elsewhere
        n: float((w - init[n]).abs().max())
        for n, w in raw.model.state_dict().items()
        if w.shape == init[n].shape
    }
    assert sum(d > 0 for d in moved.values()) >= 0.9 * len(moved), "training left weights as-is"
    raw_sd = raw.model.state_dict()  # the EMA (with warmup) is a distinct average
    assert any(not torch.equal(ema[n], raw_sd[n]) for n in moved)
    assert any(not torch.equal(ema[n], init[n]) for n in moved)
