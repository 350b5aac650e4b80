"""Zero-shot likelihood: one checkpoint, several corpora, one call.

Each source (a local .txt[.gz]/.jsonl[.gz]/.parquet file or 'hf:NAME[:CONFIG][@SPLIT]') is
tokenized on the fly with the checkpoint's tokenizer by `xdlm.data.prepare` itself (into a
temporary directory, every document in one split), so the document rule, BOS/EOS insertion and
wrap/pad rules are exactly those of training data:

  - every document becomes BOS d EOS (`xdlm.data.prepare`);
  - "wrap" (the MDLM/XDLM zero-shot setting for OpenWebText-trained models): documents are
    concatenated and cut into rows of exactly L tokens, the incomplete tail row is dropped;
  - "pad": one document per row (longer ones split into L-token chunks), right-padded; padding
    is neither noised nor counted;
  - at most `max_tokens` tokens are evaluated: the first ⌈max_tokens / L⌉ rows (in document
    order), so pad mode may count fewer real tokens.

The rules are written into the result next to the bound, so a table states what it measured.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule
from xdlm.data.loader import TokenShards
from xdlm.data.prepare import prepare
from xdlm.data.tokenizers import TextTokenizer
from xdlm.eval.likelihood import evaluate_rows, shard_batches


def zero_shot_rules(tokenizer: TextTokenizer, seq_len: int, mode: str, max_tokens: int | None):
    """The evaluation rules as a JSON-able dict (recorded with every zero-shot result)."""
    return {
        "mode": mode,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "bos_eos": "BOS doc EOS per document (xdlm.data.prepare)",
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id if mode == "pad" else None,
        "documents": "xdlm.data.documents rule (blank-line separated for .txt)",
        "tokenizer": tokenizer.spec,
    }


def zero_shot(
    denoiser, kernel: MixedKernel, schedule: Schedule, tokenizer: TextTokenizer,
    sources: Sequence[str | Path], *, seq_len: int, mode: str = "wrap",
    max_tokens: int | None = None, batch_size: int = 16, text_field: str = "text",
    progress: bool = False, **kwargs,
) -> dict[str, dict]:  # fmt: skip
    """Bound on each source: {source: {"rules": ..., "tokens_available": ..., **LikelihoodResult}}.

    `kwargs` go to `evaluate_rows` (seed, t_samples, method, t_min, discrete_steps);
    `progress` shows a tqdm bar per corpus.
    """
    if tokenizer.vocab_size != kernel.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model has {kernel.vocab_size}; "
            "pass the checkpoint's own tokenizer"
        )
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    max_rows = None if max_tokens is None else math.ceil(max_tokens / seq_len)
    rules = zero_shot_rules(tokenizer, seq_len, mode, max_tokens)
    out = {}
    with tempfile.TemporaryDirectory(prefix="xdlm-zeroshot-") as tmp:
        for n, source in enumerate(sources):
            data_dir = Path(tmp) / f"corpus{n}"
            prepare([source], data_dir, tokenizer=tokenizer, seq_len=seq_len, mode=mode,
                    valid_fraction=0.0, text_field=text_field)  # fmt: skip
            shards = TokenShards(data_dir, "train")
            desc = f"zero-shot {Path(str(source)).name}" if progress else None
            batches = shard_batches(shards, batch_size, max_rows, desc)
            result = evaluate_rows(denoiser, kernel, schedule, batches, **kwargs)
            info = shards.manifest.splits["train"]
            out[str(source)] = {
                "rules": rules,
                "documents": info.documents,
                "tokens_available": info.tokens,
                **result.to_dict(),
            }
    return out
