"""Text -> tokenized memmap shards: `prepare(inputs, out_dir, ...)`, streaming and parallel.

Pipeline: documents are read lazily (rule in `xdlm.data.documents`) and counted; the split
train/valid is BY DOCUMENT with a fixed permutation from `seed` (`split_indices`); a "char" or
"bpe" tokenizer is trained from an iterator over the TRAIN documents; then the documents are
read again, tokenized by `num_proc` worker processes in batches (`xdlm.data.encoding`, order
kept) and appended to `{split}.bin` of shape (rows, seq_len) as they come
(`xdlm.data.shard_writer`):
  - mode "wrap" (paper's LM1B/OWT setting): documents are concatenated as
    BOS d1 EOS BOS d2 EOS ... and cut into rows of exactly `seq_len`; the tail that does not fill
    a whole row is dropped. No pad appears.
  - mode "pad": each document becomes BOS d EOS; a longer one is split into consecutive
    `seq_len` chunks (`pad_overflow="split"`) or cut after the first (`"truncate"`); rows are
    right-padded with `pad_id` and `{split}.lengths.npy` (int64, (rows,)) holds the real length.
Ids are stored as uint16 when `vocab_size <= 65535`, else uint32. The output is the same bytes
for every `num_proc`.

Memory is bounded by the batches in flight (2 * num_proc batches of about `batch_bytes` of
text) whatever the corpus size and whatever the length of a document (documents are read and
tokenized as pieces of at most `MAX_PIECE_CHARS` characters, `iter_pieces`), plus ~9 bytes
per document while the split is drawn and 1 byte per document for the split mask. Work
happens in `.{out_dir}.partial` next to `out_dir`, which is renamed into place only when
complete (a crash never leaves a half-written dataset), by one process at a time
(`.{out_dir}.lock`, `xdlm.dirlock`: a second one is refused, naming the holder, or waits with
`wait=True`); a checkpoint (`progress.json`) every `checkpoint_seconds` lets an interrupted
run with the same arguments resume where it stopped.

Example:
    from xdlm.data import embedded_corpus_path, prepare
    prepare([embedded_corpus_path()], "runs/data/austen-char", tokenizer="char", seq_len=256)
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.metadata
import itertools
import json
import shutil
import time
import uuid
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xdlm.data.documents import (
    HF_PREFIX,
    MAX_PIECE_CHARS,
    Piece,
    iter_pieces,
    read_documents,
    split_documents,
)
from xdlm.data.encoding import encode_stream
from xdlm.data.manifest import MANIFEST_FILE, Manifest, storage_dtype
from xdlm.data.shard_writer import SplitFormat, SplitWriter, WriterState
from xdlm.data.splits import split_indices, valid_mask
from xdlm.data.tokenizers import TextTokenizer, load_tokenizer, load_tokenizer_dir
from xdlm.dirlock import acquire_lock
from xdlm.diskfull import describe, is_disk_full

__all__ = ["prepare", "read_documents", "split_documents", "split_indices"]

MODES = ("wrap", "pad")
PAD_OVERFLOW = ("split", "truncate")
PROGRESS_FILE = "progress.json"


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
    num_proc: int = 1,
    resume: bool = True,
    progress: bool | None = None,
    batch_bytes: int = 1 << 20,
    checkpoint_seconds: float = 60.0,
    wait: bool = False,
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
        num_proc: tokenizer worker processes (1: tokenize in this process).
        resume: continue an interrupted run with the same arguments from its last checkpoint
            (False: discard it and start over).
        progress: show progress bars (None: only on a terminal).
        batch_bytes: about this much text per tokenizer batch.
        checkpoint_seconds: seconds between resumable checkpoints.
        wait: when another process prepares `out_dir` (it holds `.{out_dir}.lock`), wait for it
            instead of raising `DirLockedError` (then `out_dir` usually exists: FileExistsError).
    """
    _check_args(seq_len, mode, pad_overflow, valid_fraction, valid_docs, num_proc)
    out_dir = Path(out_dir)
    sources = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not sources:
        raise ValueError("no inputs given; pass text files or 'hf:NAME' dataset names")
    sources = [Path(s) if not str(s).startswith(HF_PREFIX) else str(s) for s in sources]
    with acquire_lock(
        out_dir.parent / f".{out_dir.name}.lock", guards=out_dir, holder="xdlm prepare",
        harm="Two preparations of one --out mix their shards", wait=wait,
    ):  # fmt: skip
        if out_dir.exists() and not overwrite:
            raise FileExistsError(
                f"{out_dir} already exists; pass overwrite=True (--overwrite) or another out_dir"
            )
        job = _Job(
            sources=sources, text_field=text_field, seq_len=seq_len, mode=mode,
            pad_overflow=pad_overflow, valid_fraction=valid_fraction, valid_docs=valid_docs,
            seed=seed, tokenizer=tokenizer, tokenizer_source=tokenizer_source,
            tokenizer_vocab_size=tokenizer_vocab_size, num_proc=num_proc, progress=progress,
            batch_bytes=batch_bytes, checkpoint_seconds=checkpoint_seconds,
            work=out_dir.parent / f".{out_dir.name}.partial",
        )  # fmt: skip
        try:
            manifest = job.open_and_run(resume)
        except Exception as err:
            if not is_disk_full(err):
                raise
            raise OSError(
                errno.ENOSPC,
                f"preparing {out_dir} failed: {describe(err)} while writing {job.work}; free "
                "disk space and run the same command again: it continues from its last "
                "checkpoint (--no-resume starts over)",
            ) from err
        _replace_dir(job.work, out_dir)
    return manifest


@dataclasses.dataclass
class _Job:
    """One preparation: its arguments, the work directory and its checkpointed progress."""

    sources: list
    text_field: str
    seq_len: int
    mode: str
    pad_overflow: str
    valid_fraction: float
    valid_docs: int | None
    seed: int
    tokenizer: TextTokenizer | str
    tokenizer_source: str | Path | None
    tokenizer_vocab_size: int | None
    num_proc: int
    progress: bool | None
    batch_bytes: int
    checkpoint_seconds: float
    work: Path
    state: dict = dataclasses.field(default_factory=dict)

    def open_and_run(self, resume: bool) -> Manifest:
        """`open`, then `run`; bad input removes the work directory (nothing worth resuming),
        a refused resume keeps it, any other failure keeps the last checkpoint in it."""
        self.open(resume)
        try:
            return self.run()
        except (ValueError, FileNotFoundError):
            shutil.rmtree(self.work, ignore_errors=True)
            raise

    def run(self) -> Manifest:
        if "n_docs" not in self.state:
            self.state["n_docs"] = self._count()
            self._save_state()
        n_docs = self.state["n_docs"]
        is_valid = valid_mask(n_docs, self.valid_fraction, self.valid_docs, self.seed)
        tok = self._tokenizer(is_valid)
        writers = self._writers(tok, has_valid=bool(is_valid.any()))
        try:
            self._encode_all(tok, writers, is_valid)
            splits = {name: w.finish() for name, w in writers.items()}
        finally:  # a failed split (e.g. 0 rows) leaves no other split's file open
            for w in writers.values():
                w.close()
        manifest = Manifest(
            tokenizer=tok.spec, vocab_size=tok.vocab_size, mask_id=tok.mask_id,
            pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=self.seq_len,
            mode=self.mode, dtype=_dtype(tok), splits=splits,
            sources=[str(s) for s in self.sources], seed=self.seed,
            library_version=_library_version(), tokenizer_sha256=tok.fingerprint(),
        )  # fmt: skip
        (self.work / MANIFEST_FILE).write_text(manifest.to_json())
        (self.work / PROGRESS_FILE).unlink()
        return manifest

    def _plan(self) -> dict:
        """The arguments that determine the output bytes (a resumed run must match them)."""
        tok, source = self.tokenizer, self.tokenizer_source
        tok_plan = tok.spec | {"special_ids": tok.special_ids} if not isinstance(tok, str) else tok
        return {
            "sources": [_source_id(s) for s in self.sources], "text_field": self.text_field,
            "seq_len": self.seq_len, "mode": self.mode, "pad_overflow": self.pad_overflow,
            "valid_fraction": self.valid_fraction, "valid_docs": self.valid_docs,
            "seed": self.seed, "tokenizer": tok_plan,
            "tokenizer_source": None if source is None else str(source),
            "tokenizer_vocab_size": self.tokenizer_vocab_size, "max_piece_chars": MAX_PIECE_CHARS,
        }  # fmt: skip

    def open(self, resume: bool) -> None:
        """Continue the checkpoint in `work` when allowed and matching, else start afresh."""
        path = self.work / PROGRESS_FILE
        if resume and path.is_file():
            saved = json.loads(path.read_text())
            if saved["plan"] != json.loads(json.dumps(self._plan())):
                raise ValueError(
                    f"{self.work} holds an unfinished preparation with other arguments or "
                    "changed inputs; pass resume=False (--no-resume) to discard it"
                )
            self.state = saved
            return
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.state = {"plan": self._plan(), "pieces_done": 0, "docs_done": 0, "splits": {}}
        self._save_state()

    def _save_state(self) -> None:
        tmp = self.work / f"{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.work / PROGRESS_FILE)

    def _pieces(self) -> Iterator[tuple[int, Piece]]:
        """(document index, piece) of every source in order (`iter_pieces`)."""
        pieces = itertools.chain.from_iterable(
            iter_pieces(s, self.text_field) for s in self.sources
        )
        doc = 0
        for piece in pieces:
            yield doc, piece
            doc += piece.last

    def _bar(self, desc: str, total: int | None = None, initial: int = 0) -> tqdm:
        disable = None if self.progress is None else not self.progress
        return tqdm(desc=desc, total=total, initial=initial, unit="doc", disable=disable)

    def _count(self) -> int:
        """Pass 1: the number of documents (the split needs it before any is assigned)."""
        with self._bar("counting documents") as bar:
            n_docs = n_long = 0
            for _, piece in self._pieces():
                n_docs += piece.last
                n_long += piece.last and not piece.first
                bar.update(piece.last)
        if n_long:
            warnings.warn(
                f"{n_long} documents over {MAX_PIECE_CHARS:,} characters were read and tokenized "
                "in pieces cut before whitespace; split such inputs into documents (blank lines "
                "in .txt, one object per line in .jsonl) if that is not wanted",
                stacklevel=5,  # the caller of prepare(): _count < run < open_and_run < prepare
            )
        if n_docs == 0:
            raise ValueError(
                f"empty corpus: no non-blank document in {[str(s) for s in self.sources]}; "
                "check the files (or text_field) hold text"
            )
        return n_docs

    def _tokenizer(self, is_valid: np.ndarray) -> TextTokenizer:
        """The saved tokenizer of a resumed run, else the given/built one (saved to `work`)."""
        directory = self.work / "tokenizer"
        if self.state.get("tokenizer_saved"):
            return load_tokenizer_dir(directory)
        tok = self.tokenizer
        if not isinstance(tok, TextTokenizer):
            train = (piece.text for doc, piece in self._pieces() if not is_valid[doc])
            texts = train if tok in ("char", "bpe") else None
            tok = load_tokenizer(tok, self.tokenizer_source, texts, self.tokenizer_vocab_size)
        tok.save(directory)
        self.state["tokenizer_saved"] = True
        self._save_state()
        return tok

    def _writers(self, tok: TextTokenizer, has_valid: bool) -> dict[str, SplitWriter]:
        fmt = SplitFormat(self.seq_len, self.mode, _dtype(tok), tok.pad_id, self.pad_overflow)
        names = ["train", "valid"] if has_valid else ["train"]
        saved = self.state["splits"]
        return {
            name: SplitWriter(
                self.work, name, fmt, WriterState(**saved[name]) if name in saved else None
            )
            for name in names
        }

    def _encode_all(self, tok, writers: dict[str, SplitWriter], is_valid: np.ndarray) -> None:
        """Pass 2: tokenize every piece not done yet and append it to its document's split."""
        done, docs_done = self.state["pieces_done"], self.state["docs_done"]
        in_flight: deque[np.ndarray] = deque()  # the document index of each piece sent

        def texts():
            for group in _batches(itertools.islice(self._pieces(), done, None), self.batch_bytes):
                in_flight.append(np.fromiter((d for d, _ in group), np.int64, len(group)))
                yield [piece for _, piece in group]

        batches = encode_stream(texts(), tok, self.work / "tokenizer", self.num_proc)
        last_checkpoint, start, n_bytes = time.monotonic(), time.monotonic(), 0
        with self._bar("tokenizing", total=len(is_valid), initial=docs_done) as bar:
            for batch in batches:
                valid = is_valid[in_flight.popleft()]
                writers["train"].add(batch, ~valid)
                if "valid" in writers:
                    writers["valid"].add(batch, valid)
                done, n_bytes = done + len(batch), n_bytes + batch.n_bytes
                docs_done += int(batch.last.sum())
                bar.update(int(batch.last.sum()))
                tokens = sum(w.state.tokens for w in writers.values())
                rate = n_bytes / 1e6 / max(time.monotonic() - start, 1e-9)
                bar.set_postfix(tokens=f"{tokens:.3g}", MBps=f"{rate:.2f}", refresh=False)
                if time.monotonic() - last_checkpoint > self.checkpoint_seconds:
                    self._checkpoint(writers, done, docs_done)
                    last_checkpoint = time.monotonic()
        self._checkpoint(writers, done, docs_done)

    def _checkpoint(self, writers: dict[str, SplitWriter], done: int, docs_done: int) -> None:
        self.state["splits"] = {n: dataclasses.asdict(w.checkpoint()) for n, w in writers.items()}
        self.state["pieces_done"], self.state["docs_done"] = done, docs_done
        self._save_state()


def _batches(items: Iterable[tuple[int, Piece]], batch_bytes: int) -> Iterator[list]:
    """Group (document, piece) pairs into lists of about `batch_bytes` characters (at least one
    piece each)."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[1].text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _source_id(source) -> list:
    """A source and, for a file, its size and mtime (a changed file cannot be resumed)."""
    if isinstance(source, Path):
        stat = source.stat() if source.is_file() else None
        return [str(source), stat and stat.st_size, stat and stat.st_mtime_ns]
    return [str(source), None, None]


def _dtype(tok: TextTokenizer) -> str:
    return storage_dtype(tok.vocab_size)


def _check_args(seq_len, mode, pad_overflow, valid_fraction, valid_docs, num_proc) -> None:
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
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc must be an int >= 1, got {num_proc!r}")


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
