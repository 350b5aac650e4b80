import gzip
import math
import random

import pytest
import torch
from eval_toys import WORDS, tiny_scorer

from xdlm.data import load_tokenizer, split_documents
from xdlm.eval.genquality import (
    distinct_n,
    generative_perplexity,
    load_scorer,
    repetition_rate,
    sample_quality,
    strip_special,
    unigram_entropy,
)


@torch.no_grad()
def _manual_nats(scorer, ids):
    x = torch.tensor([[scorer.bos_id, *ids]])
    logp = scorer.model(input_ids=x).logits.log_softmax(-1)[0, :-1]
    return -logp.gather(-1, x[0, 1:, None]).sum().item()


def test_gen_ppl_matches_manual_single_pass_and_is_batch_invariant():
    scorer = tiny_scorer()
    texts = ["the cat sat on a mat", "dog ran", "a dog ran far away and the cat sat"]
    res = generative_perplexity(scorer, texts, batch_size=3)
    one = generative_perplexity(scorer, texts, batch_size=1)
    for n, text in enumerate(texts):
        ids = scorer.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert res.sample_tokens[n] == len(ids)  # every token predicted once, BOS never
        assert res.sample_nats[n] == pytest.approx(_manual_nats(scorer, ids), rel=1e-4)
    assert res.nats == pytest.approx(one.nats, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(res.nats / res.tokens))


def test_gen_ppl_chunks_to_context():
    scorer = tiny_scorer(context=4)
    text = " ".join(WORDS * 2)  # 22 words -> pieces of 3 tokens after BOS
    ids = scorer.tokenizer(text, add_special_tokens=False)["input_ids"]
    res = generative_perplexity(scorer, [text])
    expected = sum(_manual_nats(scorer, ids[i : i + 3]) for i in range(0, len(ids), 3))
    assert res.tokens == len(ids) and res.nats == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="no scorer token"):
        generative_perplexity(scorer, [""])


def test_load_scorer_from_local_dir(tmp_path):
    scorer = tiny_scorer()
    scorer.model.save_pretrained(tmp_path)
    scorer.tokenizer.save_pretrained(tmp_path)
    loaded = load_scorer(str(tmp_path), max_context=32)
    assert loaded.context == 32 and loaded.bos_id == 0
    text = ["the cat sat on a mat"]
    assert generative_perplexity(loaded, text).nats == pytest.approx(
        generative_perplexity(scorer, text).nats, rel=1e-5
    )


def test_diversity_metrics_known_values():
    assert unigram_entropy([[1, 1, 2, 2], [3, 3, 3, 3]]) == pytest.approx(math.log(2) / 2)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_n([[1]], 2) == 0.0
    assert repetition_rate([[5] * 6], 4) == pytest.approx(1 - 1 / 3)
    assert repetition_rate([list(range(8)), [1, 2]], 4) == 0.0


def test_sample_quality_reports_all_metrics_together():
    scorer = tiny_scorer()
    tok = load_tokenizer("char", corpus_texts=[" ".join(WORDS)])
    rows = [tok.encode("the cat sat") + [tok.pad_id], [tok.bos_id, *tok.encode("a dog ran a")]]
    tokens = torch.tensor(rows)
    assert strip_special(tokens, tok.special_ids.values())[1] == tok.encode("a dog ran a")
    out = sample_quality(tokens, tok, scorer)
    keys = {"gen_ppl", "unigram_entropy", "distinct_1", "distinct_4", "repetition_rate_4"}
    assert keys <= set(out) and out["samples"] == 2 and out["scorer_tokens"] == 7


@pytest.mark.slow
def test_smollm2_real_text_far_below_shuffled(shared_data):
    pytest.importorskip("gguf")
    scorer = load_scorer("smollm2")
    text = gzip.open(shared_data / "text" / "austen.txt.gz", "rt", encoding="utf-8").read()
    docs = [d for d in split_documents(text) if len(d.split()) > 60][:4]
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(d.split(), len(d.split()))) for d in docs]
    real, shuf = generative_perplexity(scorer, docs), generative_perplexity(scorer, shuffled)
    assert real.ppl < 60 and shuf.ppl > 4 * real.ppl
