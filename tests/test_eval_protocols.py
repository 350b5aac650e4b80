"""The upstream evaluation protocols, rule by rule, on fixture strings and tiny models (offline).

Expected detokeniser outputs were worked out by hand from the upstream rule lists (each rule in
order, one pass each; PTB's " N " rule ten times)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xdlm.eval.detokenizers import lambada, lm1b, ptb, scientific_papers, wikitext
from xdlm.eval.protocols import (
    BENCHMARKS,
    counted_positions,
    detokenize,
    upstream_entropy,
    upstream_gen_ppl,
    wrap_blocks,
    zero_shot_upstream,
)


def test_wikitext_detokenizer():
    raw = (
        " = = Early life = = \n He was born in 1 @,@ 000 @-@ year ( roughly ) . "
        'He said " hi " , and it \'s 5 \u00b0 C ; fine : ok ! N '
    )
    want = (
        " == Early life ==\nHe was born in 1,000-year (roughly). "
        'He said "hi", and it\'s 5\u00b0C; fine: ok! 1 '
    )
    assert wikitext(raw) == want


def test_wikitext_keeps_the_upstream_quirk():
    """The rule r"/' [0-9]/" -> r"/'[0-9]/" writes the pattern text itself."""
    assert wikitext("a /' 5/ b") == "a /'[0-9]/ b"


def test_ptb_detokenizer():
    raw = "the company 's shares fell N N N % to $ N and it does n't matter <unk> a\\/b"
    want = "the company's shares fell 1 1 1 % to $1 and it doesn't matter ? a/b"
    assert ptb(raw) == want


def test_lm1b_detokenizer():
    raw = (
        'He said " it is fine " , see http : / / x.com / a ( really ) . '
        "It cost $ 5 and \u00a3 3 ? Yes ."
    )
    want = 'He said "it is fine", see http://x.com/a (really) . It cost $5 and \u00a33? Yes.'
    assert lm1b(raw) == want


def test_lambada_and_scientific_papers():
    assert lambada("  \u201cHello\u201d she said.  ") == '\n"Hello" she said.'
    assert scientific_papers("we use the @xmath0 method ( see [ 1 ] ) .") == (
        "we use the @xmath0 method (see [1]) ."
    )


def test_every_benchmark_names_a_known_detokenizer():
    assert {b.detokenizer for b in BENCHMARKS.values()} - {None} <= {
        "wikitext", "ptb", "lm1b", "lambada", "scientific_papers",
    }  # fmt: skip
    assert detokenize("ag_news", ["a ( b )"]) == ["a ( b )"]  # AG News: no detokeniser
    assert BENCHMARKS["lm1b"].split == "test" and BENCHMARKS["ptb"].field == "sentence"


def test_wrap_blocks_rules():
    B, E = 90, 91
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    # zero-shot: no EOS between documents; pieces of L - 2 = 3; the remainder [10] is dropped
    got = wrap_blocks(docs, seq_len=5, bos=B, eos=E)
    np.testing.assert_array_equal(got, [[B, 1, 2, 3, E], [B, 4, 5, 6, E], [B, 7, 8, 9, E]])
    got = wrap_blocks(docs, seq_len=5, bos=B, eos=E, insert_eos=True)
    want = [[B, 1, 2, 3, E], [B, E, 4, 5, E], [B, E, 6, 7, E], [B, 8, 9, 10, E]]
    np.testing.assert_array_equal(got, want)
    # groups of documents wrap separately: each group's remainder (5, then 10) is dropped
    got = wrap_blocks(docs, seq_len=4, bos=B, eos=E, group_docs=2)
    np.testing.assert_array_equal(got, [[B, 1, 2, E], [B, 3, 4, E], [B, 6, 7, E], [B, 8, 9, E]])
    assert wrap_blocks([[1]], seq_len=5, bos=0, eos=0).shape == (0, 5)


def test_counted_positions_first_eos_and_non_eos():
    E = 9
    chunk = torch.tensor([[1, 2, E, 3, E, E], [1, 2, 3, 4, 5, 6], [1, 2, E, E, E, E]])
    want = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert counted_positions(chunk, E).int().tolist() == want
    # a padded row (pad = EOS) without its own EOS: its first pad counts
    assert counted_positions(torch.tensor([[4, 5, E, E]]), E).int().tolist() == [[1, 1, 0]]


def test_upstream_entropy_counts_every_id():
    rows = torch.tensor([[1, 1, 2, 2], [3, 3, 3, 3]])
    assert upstream_entropy(rows) == pytest.approx((math.log(2) + 0.0) / 2)


def test_upstream_gen_ppl_equals_brute_force(shared_data):
    """A tiny random GPT-2 scorer; the reference loops over samples and positions by hand."""
    import json

    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    g = shared_data / "tokenizers" / "gpt2"
    merges = [tuple(m.split()) for m in (g / "vocab.bpe").read_text().splitlines()[1:] if m]
    tok = GPT2TokenizerFast(vocab=json.loads((g / "encoder.json").read_text()), merges=merges,
                            eos_token="<|endoftext|>", bos_token="<|endoftext|>")  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1,
                                       n_head=2)).eval()  # fmt: skip
    texts = ["Hello world<|endoftext|> and more", "A short one", "Third text here.", "dropped"]
    got = upstream_gen_ppl(model, tok, texts, max_length=8, batch_size=3, context=4)
    nats, count = 0.0, 0
    for text in texts[:3]:  # the 4th sample is past the last full batch
        ids = tok(text)["input_ids"][:8]
        ids = ids + [50256] * (max(len(tok(t)["input_ids"][:8]) for t in texts) - len(ids))
        for start in range(0, len(ids), 4):
            chunk = ids[start : start + 4]
            attn = [
                1 if start + i < len(tok(text)["input_ids"][:8]) else 0 for i in range(len(chunk))
            ]
            with torch.no_grad():
                logp = model(torch.tensor([chunk]), attention_mask=torch.tensor([attn])).logits[0]
            logp = logp.log_softmax(-1)
            seen_eos = 0
            for i, token in enumerate(chunk):
                seen_eos += token == 50256
                if i and (token != 50256 or seen_eos == 1):
                    nats -= float(logp[i - 1, token])
                    count += 1
    assert got.tokens == count and got.nats == pytest.approx(nats, rel=1e-5)


def test_zero_shot_upstream_on_fixture_texts(shared_data):
    """End to end on a tiny random MDLMDiT: the rows it scores are the wrap rule's rows."""
    from xdlm.core.kernel import MixedKernel
    from xdlm.core.schedules import make_schedule
    from xdlm.data.tokenizers import load_tokenizer
    from xdlm.models.mdlm_dit import MDLMDiT, MDLMDiTConfig

    tok = load_tokenizer("gpt2-mdlm", shared_data / "tokenizers" / "gpt2")
    model = MDLMDiT(MDLMDiTConfig(tok.vocab_size, 1, 16, 2, cond_dim=8)).eval()
    texts = ["The company 's shares fell N % .", "It does n't matter <unk> ."] * 4
    out = zero_shot_upstream(model, MixedKernel.mdlm(tok.vocab_size, tok.mask_id),
                             make_schedule("loglinear"), tok, "ptb", texts=texts, seq_len=16,
                             t_samples=2)  # fmt: skip
    docs = tok.encode_batch([ptb(t) for t in texts])
    rows = wrap_blocks(docs, 16, tok.bos_id, tok.eos_id)
    assert out["rules"]["rows"] == len(rows) and out["tokens"] == rows.size
    assert out["rules"]["insert_eos"] is False and math.isfinite(out["ppl"])
