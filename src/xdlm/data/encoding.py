"""Parallel, order-preserving tokenization of a document stream for `prepare`.

`encode_stream(batches, tok, tok_dir, num_proc)` maps batches of texts to `EncodedBatch`es
(BOS ids EOS per document, flat) in input order. With `num_proc > 1` the batches go to that
many worker processes, each loading the tokenizer from `tok_dir` and encoding on one core; at
most `2 * num_proc` batches are in flight, so memory is bounded by the batch size whatever the
length of the stream, and the output is the same for every `num_proc`. On Linux the workers die
with their parent (a `kill -9` of `xdlm prepare` orphans none: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import multiprocessing
import os
import signal
import sys
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from xdlm.data.tokenizers import TextTokenizer, load_tokenizer_dir

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
MAX_DOC_CHARS = 200_000  # longer documents are tokenized in pieces (`_encode_long`)


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """n documents as one flat id array: document j is `ids[offsets[j]:offsets[j + 1]]`.

    Each document is BOS ids EOS; `n_bytes` counts the UTF-8 bytes of the source texts.
    """

    ids: np.ndarray  # (sum of lengths,) int64
    offsets: np.ndarray  # (n + 1,) int64
    n_bytes: int

    def __len__(self) -> int:
        return len(self.offsets) - 1


def encode_texts(tok: TextTokenizer, texts: list[str]) -> EncodedBatch:
    """Tokenize `texts` with `tok` and frame each document as BOS ids EOS; a document over
    `MAX_DOC_CHARS` is tokenized piece by piece (`_encode_long`)."""
    short = iter(tok.encode_batch([t for t in texts if len(t) <= MAX_DOC_CHARS]))
    encoded = [_encode_long(tok, t) if len(t) > MAX_DOC_CHARS else next(short) for t in texts]
    lengths = np.fromiter((len(ids) + 2 for ids in encoded), dtype=np.int64, count=len(texts))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.int64)
    body = np.ones(len(out), dtype=bool)
    body[offsets[:-1]] = body[offsets[1:] - 1] = False
    out[offsets[:-1]] = tok.bos_id
    out[offsets[1:] - 1] = tok.eos_id
    n_body = int(offsets[-1]) - 2 * len(texts)
    out[body] = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=n_body)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return EncodedBatch(out, offsets, n_bytes)


def _encode_long(tok: TextTokenizer, text: str, group: int = 4) -> list[int]:
    """Ids of one huge document, tokenized in pieces of at most `MAX_DOC_CHARS` characters cut
    before whitespace (where pre-tokenizers split anyway), `group` pieces at a time: memory
    grows with the piece, not the document (a 50 MB line took 19 GB in one piece)."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + MAX_DOC_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            end = cut if cut > start else end
        pieces.append(text[start:end])
        start = end
    warnings.warn(
        f"a document of {len(text):,} characters was tokenized in {len(pieces)} pieces of at "
        f"most {MAX_DOC_CHARS:,} characters cut before whitespace; split such inputs into "
        "documents (blank lines in .txt, one object per line in .jsonl) if that is not wanted",
        stacklevel=3,
    )
    ids: list[int] = []
    for first in range(0, len(pieces), group):
        for part in tok.encode_batch(pieces[first : first + group]):
            ids += part
    return ids


def encode_stream(
    batches: Iterable[list[str]], tok: TextTokenizer, tok_dir: str | Path, num_proc: int
) -> Iterator[EncodedBatch]:
    """`encode_texts` over `batches`, in order, on `num_proc` processes (module docstring)."""
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    if num_proc == 1:
        yield from (encode_texts(tok, texts) for texts in batches)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    initargs = (str(tok_dir), os.getpid())
    with ProcessPoolExecutor(
        num_proc, mp_context=context, initializer=_init_worker, initargs=initargs
    ) as pool:
        pending: deque[Future] = deque()
        for texts in batches:
            pending.append(pool.submit(_encode_in_worker, texts))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_WORKER_TOKENIZER: TextTokenizer | None = None


def _init_worker(tok_dir: str, parent: int) -> None:
    """One tokenizer per worker; its own thread pool off (the processes are the parallelism).
    The worker dies with `parent` (`_die_with_parent`)."""
    global _WORKER_TOKENIZER
    _die_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = load_tokenizer_dir(tok_dir)


def _die_with_parent(parent: int) -> None:
    """Linux: ask the kernel to SIGKILL this worker when its parent dies (PR_SET_PDEATHSIG), so
    a `kill -9` of `xdlm prepare` leaves no orphaned tokenizer processes; exit at once if the
    parent is already gone. Elsewhere a no-op (the pool's own shutdown is all there is)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # died before the request took effect
        os._exit(1)


def _encode_in_worker(texts: list[str]) -> EncodedBatch:
    assert _WORKER_TOKENIZER is not None, "worker started without _init_worker"
    return encode_texts(_WORKER_TOKENIZER, texts)
