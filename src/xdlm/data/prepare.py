"""Text -> tokenized memmap shards: `prepare(inputs, out_dir, ...)`.

Pipeline: read documents (rule in `xdlm.data.documents`), split train/valid BY DOCUMENT with a
fixed permutation from `seed`, tokenize, and write `{split}.bin` of shape (rows, seq_len):
  - mode "wrap" (paper's LM1B/OWT setting): documents are concatenated as
    BOS d1 EOS BOS d2 EOS ... and cut into rows of exactly `seq_len`; the tail that does not fill
    a whole row is dropped. No pad appears.
  - mode "pad": each document becomes BOS d EOS; a longer one is split into consecutive
    `seq_len` chunks (`pad_overflow="split"`) or cut after the first (`"truncate"`); rows are
    right-padded with `pad_id` and `{split}.lengths.npy` (int64, (rows,)) holds the real length.
Ids are stored as uint16 when `vocab_size <= 65535`, else uint32. The directory is written to a
temporary sibling and renamed into place, so a crash never leaves a half-written dataset.

Example:
    from xdlm.data import embedded_corpus_path, prepare
    prepare([embedded_corpus_path()], "runs/data/austen-char", tokenizer="char", seq_len=256)
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from xdlm.data.documents import HF_PREFIX, read_documents, split_documents
from xdlm.data.manifest import MANIFEST_FILE, Manifest, SplitInfo, sha256_file
from xdlm.data.tokenizers import TextTokenizer, load_tokenizer

__all__ = ["prepare", "read_documents", "split_documents", "split_indices"]

MODES = ("wrap", "pad")
MAX_DOC_CHARS = 200_000  # longer documents are tokenized in pieces (`_encode_long`)
PAD_OVERFLOW = ("split", "truncate")


def prepare(
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: TextTokenizer | str = "gpt2",
    seq_len: int = 1024,
    mode: str = "wrap",
    valid_fraction: float = 0.05,
    valid_docs: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    tokenizer_source: str | Path | None = None,
    tokenizer_vocab_size: int | None = None,
    pad_overflow: str = "split",
    overwrite: bool = False,
    batch_docs: int = 1024,
) -> Manifest:
    """Tokenize `inputs` into a prepared directory `out_dir` and return its manifest.

    Args:
        inputs: file paths (.txt[.gz], .jsonl[.gz], .parquet) and/or 'hf:NAME[:CONFIG][@SPLIT]'.
        tokenizer: a `TextTokenizer`, or a kind for `load_tokenizer` ("char"/"bpe" are built
            from the TRAIN documents only, with `tokenizer_vocab_size` for "bpe").
        seq_len: L, the row length.
        mode: "wrap" or "pad" (module docstring).
        valid_fraction / valid_docs: share (or exact count, which wins) of documents in "valid";
            0 writes no valid split.
        seed: fixes the document permutation (the split) and nothing else.
        pad_overflow: "split" or "truncate" documents longer than L (pad mode).
        overwrite: replace an existing `out_dir`.
        batch_docs: documents tokenized per `encode_batch` call.
    """
    _check_args(seq_len, mode, pad_overflow, valid_fraction, valid_docs)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True or another out_dir")
    sources = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    docs = _read_all(sources, text_field)
    parts = split_indices(len(docs), valid_fraction, valid_docs, seed)
    split_docs = {name: [docs[i] for i in idx] for name, idx in parts.items()}
    tok = tokenizer
    if not isinstance(tok, TextTokenizer):
        tok = load_tokenizer(tok, tokenizer_source, split_docs["train"], tokenizer_vocab_size)
    dtype = "uint16" if tok.vocab_size <= 65535 else "uint32"
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        splits = {
            name: _write_split(
                tmp, name, texts, tok, seq_len, mode, dtype, pad_overflow, batch_docs
            )
            for name, texts in split_docs.items()
        }
        tok.save(tmp / "tokenizer")
        manifest = Manifest(
            tokenizer=tok.spec, vocab_size=tok.vocab_size, mask_id=tok.mask_id,
            pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=seq_len,
            mode=mode, dtype=dtype, splits=splits, sources=[str(s) for s in sources], seed=seed,
            library_version=_library_version(), tokenizer_sha256=tok.fingerprint(),
        )  # fmt: skip
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def split_indices(
    n_docs: int, valid_fraction: float, valid_docs: int | None, seed: int
) -> dict[str, np.ndarray]:
    """Assign document indices to "train"/"valid" with a fixed permutation from `seed`.

    Returns sorted int64 index arrays (document order is kept inside a split); "valid" is absent
    when it would hold no document.
    """
    n_valid = valid_docs if valid_docs is not None else int(round(valid_fraction * n_docs))
    if valid_docs is None and valid_fraction > 0:
        n_valid = max(n_valid, 1)
    if n_valid >= n_docs:
        raise ValueError(
            f"the corpus has {n_docs} documents, too few to hold out {n_valid} for validation "
            "and keep some for training; add documents or lower valid_fraction/valid_docs"
        )
    perm = np.random.default_rng(seed).permutation(n_docs)
    parts = {"train": np.sort(perm[n_valid:])}
    if n_valid > 0:
        parts["valid"] = np.sort(perm[:n_valid])
    return parts


def _check_args(seq_len, mode, pad_overflow, valid_fraction, valid_docs) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if pad_overflow not in PAD_OVERFLOW:
        raise ValueError(f"unknown pad_overflow {pad_overflow!r}; choose one of {PAD_OVERFLOW}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (room for BOS and EOS), got {seq_len!r}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if valid_docs is not None and valid_docs < 0:
        raise ValueError(f"valid_docs must be >= 0 or None, got {valid_docs}")


def _read_all(sources: list, text_field: str) -> list[str]:
    if not sources:
        raise ValueError("no inputs given; pass text files or 'hf:NAME' dataset names")
    docs = []
    for source in sources:
        if isinstance(source, str) and not source.startswith(HF_PREFIX):
            source = Path(source)
        docs.extend(read_documents(source, text_field))
    if not docs:
        raise ValueError(
            f"empty corpus: no non-blank document in {[str(s) for s in sources]}; "
            "check the files (or text_field) hold text"
        )
    return docs


def _encoded_docs(tok: TextTokenizer, texts: list[str], batch_docs: int) -> Iterator[np.ndarray]:
    """Yield BOS ids EOS per document as int64 arrays, tokenizing `batch_docs` at a time;
    documents over `MAX_DOC_CHARS` are tokenized piece by piece (`_encode_long`)."""
    bos, eos = np.asarray([tok.bos_id]), np.asarray([tok.eos_id])
    for start in range(0, len(texts), batch_docs):
        batch = texts[start : start + batch_docs]
        short = iter(tok.encode_batch([t for t in batch if len(t) <= MAX_DOC_CHARS]))
        for text in batch:
            ids = _encode_long(tok, text) if len(text) > MAX_DOC_CHARS else next(short)
            yield np.concatenate([bos, np.asarray(ids, dtype=np.int64), eos])


def _encode_long(tok: TextTokenizer, text: str, group: int = 4) -> np.ndarray:
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
    parts = []
    for first in range(0, len(pieces), group):
        encoded = tok.encode_batch(pieces[first : first + group])
        parts += [np.asarray(ids, dtype=np.int64) for ids in encoded]
    return np.concatenate(parts)


def _wrap_rows(docs: Iterator[np.ndarray], seq_len: int, chunk_rows: int = 4096):
    """Concatenate documents and yield full (n, L) blocks; the final partial row is dropped."""
    pending: list[np.ndarray] = []
    n_pending = 0
    for doc in docs:
        pending.append(doc)
        n_pending += len(doc)
        if n_pending >= chunk_rows * seq_len:
            stream = np.concatenate(pending)
            n_full = len(stream) // seq_len * seq_len
            yield stream[:n_full].reshape(-1, seq_len)
            pending, n_pending = [stream[n_full:]], len(stream) - n_full
    if n_pending >= seq_len:
        stream = np.concatenate(pending)
        yield stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)


def _pad_rows(doc: np.ndarray, seq_len: int, pad_id: int, pad_overflow: str):
    """One document -> (rows (n, L) padded with pad_id, lengths (n,))."""
    chunks = [doc[i : i + seq_len] for i in range(0, len(doc), seq_len)]
    if pad_overflow == "truncate":
        chunks = chunks[:1]
    rows = np.full((len(chunks), seq_len), pad_id, dtype=np.int64)
    for r, chunk in enumerate(chunks):
        rows[r, : len(chunk)] = chunk
    return rows, np.asarray([len(c) for c in chunks], dtype=np.int64)


def _write_split(
    tmp: Path, name: str, texts: list[str], tok: TextTokenizer, seq_len: int, mode: str,
    dtype: str, pad_overflow: str, batch_docs: int,
) -> SplitInfo:  # fmt: skip
    """Write `{name}.bin` (+ lengths in pad mode) under `tmp`; error if it gets no row."""
    path = tmp / f"{name}.bin"
    docs = _encoded_docs(tok, texts, batch_docs)
    n_rows, n_tokens, lengths = 0, 0, []
    with open(path, "wb") as f:
        if mode == "wrap":
            for block in _wrap_rows(docs, seq_len):
                f.write(block.astype(dtype).tobytes())
                n_rows += len(block)
            n_tokens = n_rows * seq_len
        else:
            for doc in docs:
                rows, lens = _pad_rows(doc, seq_len, tok.pad_id, pad_overflow)
                f.write(rows.astype(dtype).tobytes())
                lengths.append(lens)
            lengths = np.concatenate(lengths)
            n_rows, n_tokens = len(lengths), int(lengths.sum())
    if n_rows == 0:
        raise ValueError(
            f"split {name!r} yields 0 rows of seq_len={seq_len}: its {len(texts)} documents are "
            f"too short to fill one row; lower seq_len, raise valid_fraction/valid_docs, "
            "or add data"
        )
    lengths_file = None
    if mode == "pad":
        lengths_file = f"{name}.lengths.npy"
        np.save(tmp / lengths_file, lengths)
    return SplitInfo(
        file=path.name, rows=n_rows, tokens=n_tokens, documents=len(texts),
        sha256=sha256_file(path), lengths_file=lengths_file,
    )  # fmt: skip


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move `tmp` to `out_dir`, replacing an existing `out_dir` only after `tmp` is complete."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def _library_version() -> str:
    try:
        return importlib.metadata.version("xdlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
