"""The evaluation protocols of the MDLM / Duo / XDLM papers, each rule named and in one place.

Zero-shot likelihood (`zero_shot_upstream`), as the official code runs it for an
OpenWebText-trained model (`mode=ppl_eval data=<name> data.insert_valid_eos=False
model.length=1024`):
  1. BENCHMARKS: which dataset, split and text field; the split is "test" for LM1B and AG News
     and "validation" otherwise; OWT valid is the last 100,000 documents of OpenWebText's train;
  2. detokenise each document (`eval/detokenizers.py`; none for AG News and OWT);
  3. tokenise each document with the model's tokenizer, no special tokens;
  4. `wrap_blocks`: per group of `GROUP_DOCS` = 1,000 documents (the `datasets.map` batch of the
     official code), concatenate (with an EOS after each document only when `insert_eos`, which
     is False for zero-shot: `INSERT_VALID_EOS`), cut into pieces of L − 2 tokens, DROP the
     group's remainder, and emit BOS + piece + EOS (rows of exactly L = `ZERO_SHOT_L` = 1,024);
  5. every position of every row counts (BOS and EOS included; no padding exists); the NELBO
     bound per token is averaged over all tokens and PPL = exp(mean).

Generative perplexity (`upstream_gen_ppl`), as Duo / XDLM `metrics.py` computes it:
  1. samples -> text with the model tokenizer's decode, special tokens KEPT (GPT-2 writes
     "<|endoftext|>");
  2. retokenise with the scorer's tokenizer (GPT-2 Large: adds no BOS), truncated to
     `max_length` = L, right-padded to the longest with PAD = the scorer's EOS;
  3. rows are cut into chunks of `context` = 1,024 tokens and each chunk scored by the causal LM;
     position i >= 1 is predicted from positions < i of its chunk;
  4. a predicted position counts when its token is not EOS, or is the FIRST EOS of the chunk
     (so in a padded row without EOS the first pad counts);
  5. batches of `batch_size` samples; samples past the last full batch are DROPPED;
  6. gen-PPL = exp(Σ nll · counted / Σ counted) over all batches.
Entropy beside it (`upstream_entropy`): per sample, the entropy (nats) of the histogram of ALL
its L token ids (special ids included), averaged over samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from xdlm.eval.detokenizers import DETOKENIZERS

ZERO_SHOT_L = 1024
INSERT_VALID_EOS = False
GROUP_DOCS = 1000
GEN_PPL_SCORER = "gpt2-large"
GEN_PPL_CONTEXT = 1024


@dataclass(frozen=True)
class Benchmark:
    """One zero-shot corpus: `datasets.load_dataset(path, config, split=split)[field]`."""

    path: str
    config: str | None
    split: str
    field: str
    detokenizer: str | None


BENCHMARKS: dict[str, Benchmark] = {
    "ptb": Benchmark("ptb_text_only", None, "validation", "sentence", "ptb"),
    "wikitext2": Benchmark("wikitext", "wikitext-2-raw-v1", "validation", "text", "wikitext"),
    "wikitext103": Benchmark("wikitext", "wikitext-103-raw-v1", "validation", "text", "wikitext"),
    "lm1b": Benchmark("lm1b", None, "test", "text", "lm1b"),
    # upstream reads https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl;
    # EleutherAI/lambada_openai (test) is that file on the Hub
    "lambada": Benchmark("EleutherAI/lambada_openai", "default", "test", "text", "lambada"),
    "ag_news": Benchmark("ag_news", None, "test", "text", None),
    "pubmed": Benchmark(
        "scientific_papers", "pubmed", "validation", "article", "scientific_papers"
    ),
    "arxiv": Benchmark("scientific_papers", "arxiv", "validation", "article", "scientific_papers"),
    "owt": Benchmark("openwebtext", None, "train[-100000:]", "text", None),
}


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown zero-shot benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_benchmark_texts(name: str) -> list[str]:
    """The raw documents of a benchmark from the HF Hub (needs `datasets` and the internet)."""
    import datasets

    b = benchmark(name)
    try:
        data = datasets.load_dataset(b.path, b.config, split=b.split)
    except Exception as err:  # offline / moved dataset: many types
        raise ValueError(
            f"could not load {b.path} ({b.config}, {b.split}) for {name}: {err}; "
            "pass the documents yourself (--texts FILE.jsonl with a 'text' field)"
        ) from err
    return list(data[b.field])


def detokenize(name: str, texts: Iterable[str]) -> list[str]:
    """Rule 2: the benchmark's detokeniser applied to every document (identity when none)."""
    rule = benchmark(name).detokenizer
    fn: Callable[[str], str] = DETOKENIZERS[rule] if rule else (lambda s: s)
    return [fn(t) for t in texts]


def wrap_blocks(
    docs: Sequence[Sequence[int]], seq_len: int, bos: int, eos: int,
    insert_eos: bool = INSERT_VALID_EOS, group_docs: int = GROUP_DOCS,
) -> np.ndarray:  # fmt: skip
    """Rule 4: token ids per document -> rows (N, seq_len) of BOS + piece + EOS."""
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 (BOS, a token, EOS), got {seq_len}")
    piece = seq_len - 2
    rows = []
    for start in range(0, len(docs), group_docs):
        stream = [t for d in docs[start : start + group_docs] for t in [*d, *([eos] * insert_eos)]]
        for i in range(0, len(stream) - piece + 1, piece):
            rows.append([bos, *stream[i : i + piece], eos])
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), seq_len)


def zero_shot_upstream(
    denoiser, kernel, schedule, tokenizer, name: str, *, texts: Sequence[str] | None = None,
    seq_len: int = ZERO_SHOT_L, max_rows: int | None = None, batch_size: int = 16, **kwargs,
) -> dict:  # fmt: skip
    """The bound on benchmark `name` under the rules above; `kwargs` go to `evaluate_rows`."""
    from xdlm.data.loader import Rows
    from xdlm.eval.likelihood import evaluate_rows

    raw = load_benchmark_texts(name) if texts is None else list(texts)
    docs = tokenizer.encode_batch(detokenize(name, raw))
    rows = torch.from_numpy(wrap_blocks(docs, seq_len, tokenizer.bos_id, tokenizer.eos_id))
    if max_rows is not None:
        rows = rows[:max_rows]
    if len(rows) == 0:
        raise ValueError(f"{name}: the documents give no full row of {seq_len} tokens")
    batches = (
        (torch.arange(s, s + len(chunk)), Rows(chunk, None))
        for s, chunk in zip(range(0, len(rows), batch_size), rows.split(batch_size), strict=True)
    )
    result = evaluate_rows(denoiser, kernel, schedule, batches, **kwargs)
    rules = {"seq_len": seq_len, "insert_eos": INSERT_VALID_EOS, "group_docs": GROUP_DOCS,
             "detokenizer": benchmark(name).detokenizer, "documents": len(raw),
             "rows": len(rows)}  # fmt: skip
    return {"benchmark": name, "rules": rules, **result.to_dict()}


@dataclass(frozen=True)
class GenPPLCounts:
    """Σ nll over counted positions, how many were counted, and the resulting gen-PPL."""

    nats: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nats / self.tokens) if self.tokens else float("nan")


def counted_positions(chunk: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Rule 4: (B, C) scorer ids -> (B, C − 1) bool, which predicted positions 1.. count."""
    is_eos = chunk == eos_id
    first_eos = is_eos.cumsum(-1) == 1
    return (first_eos | ~is_eos)[:, 1:]


@torch.no_grad()
def upstream_gen_ppl(
    model, hf_tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
    context: int = GEN_PPL_CONTEXT,
) -> GenPPLCounts:  # fmt: skip
    """Rules 2-6 for a transformers causal LM `model` and its tokenizer `hf_tokenizer`."""
    if hf_tokenizer.pad_token is None:
        hf_tokenizer.pad_token = hf_tokenizer.eos_token
    enc = hf_tokenizer(list(texts), return_tensors="pt", return_token_type_ids=False,
                       truncation=True, padding=True, max_length=max_length)  # fmt: skip
    ids, mask = enc["input_ids"], enc["attention_mask"]
    device = next(model.parameters()).device
    nats, tokens = 0.0, 0
    batch_size = min(batch_size, len(ids))
    for b in range(len(ids) // batch_size):
        rows = slice(b * batch_size, (b + 1) * batch_size)
        for chunk, m in zip(
            ids[rows].split(context, -1), mask[rows].split(context, -1), strict=True
        ):
            logits = model(chunk.to(device), attention_mask=m.to(device)).logits
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), chunk[:, 1:].to(device),
                                  reduction="none")  # fmt: skip
            counted = counted_positions(chunk, hf_tokenizer.eos_token_id).to(device)
            nats += float((nll * counted).sum())
            tokens += int(counted.sum())
    return GenPPLCounts(nats, tokens)


def upstream_entropy(samples: torch.Tensor) -> float:
    """Mean over samples (B, L) of the entropy (nats) of each row's histogram of all L ids."""
    values = []
    for row in samples:
        counts = torch.unique(row, return_counts=True)[1].double()
        p = counts / counts.sum()
        values.append(float(-(p * p.log()).sum()))
    return sum(values) / len(values)
