"""Incremental writer of one split's `{split}.bin` (rows, L) for `prepare`, with resume state.

Documents arrive as `EncodedBatch`es of pieces (a long document comes in several, possibly
across batches) and are appended to the file as they come, so memory holds one batch plus fewer
than L carried-over tokens:
  - "wrap": the document stream is cut into rows of exactly L; the tail that does not fill a
    row waits for the next batch (and is dropped at the end).
  - "pad": each document becomes ceil(n / L) rows ("split") or its first row ("truncate"),
    right-padded with `pad_id`; its unfinished row waits for its next piece. The real lengths
    go to a raw int64 side file, turned into `{split}.lengths.npy` by `finish`.
`checkpoint()` flushes to disk and returns a `WriterState`; a writer built from that state
truncates its files to it and continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from xdlm.data.encoding import EncodedBatch
from xdlm.data.manifest import SplitInfo, sha256_file


@dataclasses.dataclass
class WriterState:
    """What a split holds at a checkpoint: rows written, real tokens, documents, the carried
    tokens (wrap: the stream's tail; pad: the open document's unfinished row) and the rows the
    open document has written (pad)."""

    rows: int = 0
    tokens: int = 0
    documents: int = 0
    tail: list[int] = dataclasses.field(default_factory=list)
    doc_rows: int = 0


@dataclasses.dataclass(frozen=True)
class SplitFormat:
    """How rows are laid out: L, "wrap"/"pad", storage dtype, pad id and overflow rule."""

    seq_len: int
    mode: str
    dtype: str
    pad_id: int
    pad_overflow: str


class SplitWriter:
    """Append documents to `directory/{name}.bin` (module docstring)."""

    def __init__(self, directory: Path, name: str, fmt: SplitFormat, state: WriterState | None):
        self.name, self.fmt = name, fmt
        self.directory = Path(directory)
        self.state = dataclasses.replace(state) if state is not None else WriterState()
        self._tail = np.asarray(self.state.tail, dtype=np.int64)
        row_bytes = fmt.seq_len * np.dtype(fmt.dtype).itemsize
        self._bin = _open_at(self.bin_path, self.state.rows * row_bytes, state is not None)
        self._lengths = None
        if fmt.mode == "pad":
            try:
                self._lengths = _open_at(self._lengths_raw, self.state.rows * 8, state is not None)
            except ValueError:  # a refused resume leaves no file open
                self._bin.close()
                raise

    @property
    def bin_path(self) -> Path:
        return self.directory / f"{self.name}.bin"

    @property
    def _lengths_raw(self) -> Path:
        return self.directory / f"{self.name}.lengths.partial"

    def add(self, batch: EncodedBatch, keep: np.ndarray) -> None:
        """Append the pieces j of `batch` with `keep[j]` (bool (n,)), in order (all pieces of a
        document have the same `keep`)."""
        if not keep.any():
            return
        self.state.documents += int((keep & batch.last).sum())
        if self.fmt.mode == "wrap":
            self._add_wrap(batch.ids[np.repeat(keep, np.diff(batch.offsets))])
        else:
            offsets, kept = batch.offsets, np.flatnonzero(keep)
            self._add_pad([batch.ids[offsets[j] : offsets[j + 1]] for j in kept], batch.last[kept])

    def _add_wrap(self, ids: np.ndarray) -> None:
        L = self.fmt.seq_len
        stream = np.concatenate([self._tail, ids])
        n_full = len(stream) // L * L
        self._bin.write(stream[:n_full].astype(self.fmt.dtype).tobytes())
        self._tail = stream[n_full:]
        self.state.rows += n_full // L
        self.state.tokens += n_full

    def _add_pad(self, pieces: list[np.ndarray], last: np.ndarray) -> None:
        L, truncate = self.fmt.seq_len, self.fmt.pad_overflow == "truncate"
        chunks = []
        for ids, end in zip(pieces, last, strict=True):
            stream = np.concatenate([self._tail, ids])
            n_full = 0 if truncate and self.state.doc_rows else len(stream) // L * L
            if truncate:
                n_full = min(n_full, L)
            chunks += [stream[i : i + L] for i in range(0, n_full, L)]
            self.state.doc_rows += n_full // L
            stream = stream[n_full:] if not (truncate and self.state.doc_rows) else stream[:0]
            if end:
                if len(stream):
                    chunks.append(stream)
                stream, self.state.doc_rows = stream[:0], 0
            self._tail = stream
        if not chunks:
            return
        rows = np.full((len(chunks), L), self.fmt.pad_id, dtype=np.int64)
        lengths = np.asarray([len(c) for c in chunks], dtype=np.int64)
        for r, chunk in enumerate(chunks):
            rows[r, : len(chunk)] = chunk
        self._bin.write(rows.astype(self.fmt.dtype).tobytes())
        self._lengths.write(lengths.tobytes())
        self.state.rows += len(chunks)
        self.state.tokens += int(lengths.sum())

    def checkpoint(self) -> WriterState:
        """Flush and fsync the files; the returned state resumes from exactly here."""
        for f in (self._bin, self._lengths):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
        self.state.tail = self._tail.tolist()
        return dataclasses.replace(self.state)

    def close(self) -> None:
        """Close the files (idempotent; what was written stays)."""
        for f in (self._bin, self._lengths):
            if f is not None:
                f.close()

    def finish(self) -> SplitInfo:
        """Close the files and describe the split; ValueError when it holds no row."""
        self.checkpoint()
        self.close()
        if self.state.rows == 0:
            raise ValueError(
                f"split {self.name!r} yields 0 rows of seq_len={self.fmt.seq_len}: its "
                f"{self.state.documents} documents are too short to fill one row; lower "
                "seq_len, raise valid_fraction/valid_docs, or add data"
            )
        lengths_file = None
        if self.fmt.mode == "pad":
            lengths_file = f"{self.name}.lengths.npy"
            _raw_to_npy(self._lengths_raw, self.directory / lengths_file, self.state.rows)
        return SplitInfo(
            file=self.bin_path.name, rows=self.state.rows, tokens=self.state.tokens,
            documents=self.state.documents, sha256=sha256_file(self.bin_path),
            lengths_file=lengths_file,
        )  # fmt: skip


def _open_at(path: Path, size: int, resume: bool):
    """Open `path` for appending at byte `size`: truncated there on resume, new otherwise."""
    if not resume:
        return open(path, "wb")
    if not path.is_file() or path.stat().st_size < size:
        raise ValueError(
            f"cannot resume: {path} is missing or shorter than its checkpoint ({size} bytes); "
            "prepare again with resume=False (--no-resume)"
        )
    f = open(path, "r+b")
    f.truncate(size)
    f.seek(size)
    return f


def _raw_to_npy(raw: Path, npy: Path, rows: int, chunk: int = 1 << 20) -> None:
    """Copy a raw int64 file of `rows` values into a `.npy`, `chunk` values at a time."""
    src = np.memmap(raw, dtype=np.int64, mode="r", shape=(rows,))
    dst = np.lib.format.open_memmap(npy, mode="w+", dtype=np.int64, shape=(rows,))
    for start in range(0, rows, chunk):
        dst[start : start + chunk] = src[start : start + chunk]
    dst.flush()
    del src, dst
    raw.unlink()
