"""Parallel, order-preserving tokenization of a document stream for `prepare`.

`encode_stream(batches, tok, tok_dir, num_proc)` maps batches of texts or document `Piece`s to
`EncodedBatch`es (flat ids; BOS before each document, EOS after it) in input order. With
`num_proc > 1` the batches go to that many worker processes, each loading the tokenizer from
`tok_dir` and encoding on one core; at most `2 * num_proc` batches are in flight, so memory is
bounded by the batch size whatever the length of the stream, and the output is the same for
every `num_proc`. On Linux the workers die
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
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from xdlm.data.documents import Piece
from xdlm.data.tokenizers import TextTokenizer, load_tokenizer_dir

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """n pieces of documents as one flat id array: piece j is `ids[offsets[j]:offsets[j + 1]]`,
    with BOS in front of a document's first piece (`first[j]`) and EOS after its last
    (`last[j]`); a whole document is one piece with both. `n_bytes` counts the UTF-8 bytes of
    the source texts."""

    ids: np.ndarray  # (sum of lengths,) int64
    offsets: np.ndarray  # (n + 1,) int64
    first: np.ndarray  # (n,) bool
    last: np.ndarray  # (n,) bool
    n_bytes: int

    def __len__(self) -> int:
        return len(self.offsets) - 1


def encode_texts(tok: TextTokenizer, texts: Sequence[str | Piece]) -> EncodedBatch:
    """Tokenize `texts` with `tok`: a `Piece` (`xdlm.data.documents.iter_pieces`) is framed by
    its flags, a plain string is a whole document (BOS ids EOS)."""
    pieces = [t if isinstance(t, Piece) else Piece(t, True, True) for t in texts]
    first = np.fromiter((p.first for p in pieces), dtype=bool, count=len(pieces))
    last = np.fromiter((p.last for p in pieces), dtype=bool, count=len(pieces))
    encoded = tok.encode_batch([p.text for p in pieces])
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(pieces))
    lengths += first.astype(np.int64) + last.astype(np.int64)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.int64)
    bos, eos = offsets[:-1][first], offsets[1:][last] - 1
    body = np.ones(len(out), dtype=bool)
    body[bos] = body[eos] = False
    out[bos], out[eos] = tok.bos_id, tok.eos_id
    n_body = int(body.sum())
    out[body] = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=n_body)
    n_bytes = sum(len(p.text.encode("utf-8")) for p in pieces)
    return EncodedBatch(out, offsets, first, last, n_bytes)


def encode_stream(
    batches: Iterable[list[str | Piece]], tok: TextTokenizer, tok_dir: str | Path, num_proc: int
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


def _encode_in_worker(texts: list[str | Piece]) -> EncodedBatch:
    assert _WORKER_TOKENIZER is not None, "worker started without _init_worker"
    return encode_texts(_WORKER_TOKENIZER, texts)
