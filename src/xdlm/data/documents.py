"""Reading raw text sources into documents (lists of strings).

The document rule, shared by data preparation and zero-shot evaluation:
  - `.txt` / `.txt.gz`: the file is split at blank lines (lines holding only whitespace); each
    run of non-blank lines is one document, kept verbatim (inner line breaks included) except
    that `\\r\\n` becomes `\\n` and the run's outer whitespace is stripped. A file without blank
    lines is therefore ONE document.
  - `.jsonl` / `.jsonl.gz`: one JSON object per line; its `text_field` (default "text") is one
    document.
  - `.parquet`: each row's `text_field` column value is one document (needs `pyarrow`).
  - `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset streamed by `datasets.load_dataset(...,
    streaming=True)` (needs internet); each row's `text_field` is one document; SPLIT defaults
    to "train".
`iter_documents` reads any source lazily (memory: one document); `read_documents` lists it.
`iter_pieces` reads it as `Piece`s of at most `MAX_PIECE_CHARS` characters, cut before
whitespace: a document is one piece or several, and for `.txt` sources memory stays bounded
whatever the shape of the input (a single line of any length, a run of whitespace of any
length), since the file is read in pieces too (`_text_pieces`). Empty documents are dropped
everywhere.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

HF_PREFIX = "hf:"
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
_BLANK_CHARS = " \t\f\v"
_BLANK_LINES = re.compile(f"\\n[{_BLANK_CHARS}]*\\n")
MAX_PIECE_CHARS = 200_000  # longer documents are read and tokenized in pieces


@dataclass(frozen=True)
class Piece:
    """Consecutive text of one document: `first` / `last` mark its first and last piece."""

    text: str
    first: bool
    last: bool


def split_documents(text: str) -> list[str]:
    """Split text at blank lines into stripped, non-empty documents (see module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [d.strip() for d in _BLANK_LINES.split(text) if d.strip()]


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Read one source (`.txt[.gz]`, `.jsonl[.gz]`, `.parquet` or `hf:` name) into documents."""
    return list(iter_documents(path, text_field))


def iter_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one source lazily (same rule and order as `read_documents`).

    Memory holds one document (text), one line (JSONL), one record batch (parquet) or one
    streamed row (hf:) at a time, whatever the size of the source.
    """
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        return _iter_hf(path, text_field)
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"input {path} is a directory; pass the files in it (e.g. {path}/*.txt), "
            f"each one of {'/'.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"input file {path} does not exist; pass existing {'/'.join(SUFFIXES)} files "
            f"or a Hugging Face dataset as '{HF_PREFIX}NAME[:CONFIG][@SPLIT]'"
        )
    name = path.name.lower()
    if name.endswith((".txt", ".txt.gz")):
        return _decoded(path, _iter_text(path))
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _decoded(path, _iter_jsonl(path, text_field))
    if name.endswith(".parquet"):
        return _iter_parquet(path, text_field)
    raise ValueError(f"unsupported input {path}: expected a file ending in {', '.join(SUFFIXES)}")


def _open_text(path: Path):
    """Text mode with universal newlines: `\r\n` and `\r` arrive as `\n`."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_pieces(
    path: str | Path, text_field: str = "text", max_chars: int = MAX_PIECE_CHARS
) -> Iterator[Piece]:
    """The documents of one source (`iter_documents`' rule and order) as `Piece`s of at most
    `max_chars` characters cut before whitespace; joined, a document's pieces are the document.
    `.txt` is read piece by piece (bounded memory); other formats hold one document at a time."""
    if isinstance(path, Path) or not str(path).startswith(HF_PREFIX):
        name = Path(path).name.lower()
        if name.endswith((".txt", ".txt.gz")) and Path(path).is_file():
            yield from _decoded(Path(path), _text_pieces(Path(path), max_chars))
            return
    for doc in iter_documents(path, text_field):
        yield from document_pieces(doc, max_chars)


def document_pieces(doc: str, max_chars: int = MAX_PIECE_CHARS) -> Iterator[Piece]:
    """One in-memory document as `Piece`s (the same cuts as reading it from a `.txt`)."""
    out = _PieceBuffer(max_chars)
    yield from out.add(doc)
    yield from out.finish()


class _PieceBuffer:
    """A document's text as it is read, handed out in pieces of at most `max_chars` characters
    cut before the last " " or "\n" (where pre-tokenizers split anyway), else at `max_chars`."""

    def __init__(self, max_chars: int):
        self.max_chars, self.text, self.first = max_chars, "", True

    def _piece(self, text: str, last: bool) -> Piece:
        piece, self.first = Piece(text, self.first, last), last
        return piece

    def add(self, text: str) -> Iterator[Piece]:
        text, start = self.text + text, 0
        while len(text) - start > self.max_chars:
            end = start + self.max_chars
            cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            cut = cut if cut > start else end
            yield self._piece(text[start:cut], last=False)
            start = cut
        self.text = text[start:]

    def finish(self) -> Iterator[Piece]:
        """The last piece of the document (possibly empty); the buffer starts the next one."""
        yield self._piece(self.text, last=True)
        self.text = ""


class _Held:
    """Whitespace held back until it is known to be inside a document (then emitted) or at its
    end (dropped). Past `cap` characters it moves to a temporary file: bounded memory for a
    run of whitespace of any length."""

    def __init__(self, cap: int):
        self.cap, self.parts, self.size, self.file = cap, [], 0, None

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > self.cap:
            if self.file is None:
                self.file = tempfile.TemporaryFile("w+", encoding="utf-8", newline="")
            self.file.write("".join(self.parts))
            self.parts, self.size = [], 0

    def drain(self) -> Iterator[str]:
        """The held text in chunks of at most `cap` characters, then nothing is held."""
        if self.file is not None:
            self.file.seek(0)
            while chunk := self.file.read(self.cap):
                yield chunk
        yield "".join(self.parts)
        self.clear()

    def clear(self) -> None:
        if self.file is not None:
            self.file.close()
        self.parts, self.size, self.file = [], 0, None


def _text_pieces(path: Path, max_chars: int) -> Iterator[Piece]:
    """`split_documents` of a text file, read in chunks of at most `max_chars` characters: a
    line of only [ \t\f\v] ends the current document; a document is stripped of its outer
    whitespace (held back in `_Held` until the next non-whitespace shows it is inner)."""
    out, held = _PieceBuffer(max_chars), _Held(max_chars)
    in_doc, line_blank = False, True  # line_blank: the current line holds only blanks so far
    with _open_text(path) as f:
        while chunk := f.readline(max_chars):
            ends = chunk.endswith("\n")
            body = chunk[:-1] if ends else chunk
            if line_blank and not body.strip(_BLANK_CHARS):
                if ends:  # a blank line: the document (if any) ends
                    if in_doc:
                        yield from out.finish()
                    in_doc = False
                    held.clear()
                else:
                    held.add(body)
                continue
            line_blank = False
            core = body.strip()
            if core:
                start = len(body) - len(body.lstrip())
                if in_doc:
                    held.add(body[:start])
                    for text in held.drain():
                        yield from out.add(text)
                held.clear()
                in_doc = True
                yield from out.add(core)
                held.add(body[start + len(core) :])
            else:
                held.add(body)
            if ends:
                held.add("\n")
                line_blank = True
    held.clear()
    if in_doc:
        yield from out.finish()


def _iter_text(path: Path) -> Iterator[str]:
    """`split_documents` of a text file, lazily: its pieces joined per document."""
    parts: list[str] = []
    for piece in _text_pieces(path, MAX_PIECE_CHARS):
        parts.append(piece.text)
        if piece.last:
            yield "".join(parts)
            parts = []


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno} is not valid JSON ({err.msg}); each line of a .jsonl file "
                    f'must be one object such as {{"{text_field}": "..."}}'
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{lineno} holds a JSON {type(record).__name__}, not an object; each "
                    f'line must be one object such as {{"{text_field}": "..."}}'
                )
            if text_field not in record:
                raise ValueError(
                    f"{path}:{lineno} has no field {text_field!r} (fields: {sorted(record)}); "
                    "pass text_field=<name>"
                )
            if not isinstance(record[text_field], str | None):
                kind = type(record[text_field]).__name__
                raise ValueError(
                    f"{path}:{lineno}: field {text_field!r} is a {kind}, not a string; fix the "
                    "line or pass another text_field"
                )
            yield from _kept([record[text_field]])


def _decoded(path: Path, docs: Iterator[str]) -> Iterator[str]:
    """`docs` of a text source, with undecodable bytes or a broken gzip as a ValueError."""
    try:
        yield from docs
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.object[err.start : err.start + 1]!r} cannot be "
            "decoded); convert it, e.g. iconv -f latin1 -t utf-8, or leave the binary file out"
        ) from None
    except gzip.BadGzipFile as err:
        raise ValueError(f"{path} is not a valid gzip file ({err}); recompress it") from None


def _kept(texts) -> Iterator[str]:
    """Stripped non-empty documents of `texts` (None and blank values dropped)."""
    for text in texts:
        if text and (doc := text.strip()):
            yield doc


def _iter_parquet(path: Path, text_field: str, batch_rows: int = 1024) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(
            f"{path} has no column {text_field!r} (columns: {parquet.schema_arrow.names}); "
            "pass text_field=<name>"
        )
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_field]):
        yield from _kept(batch.column(0).to_pylist())


class HFSource(NamedTuple):
    """A parsed 'hf:NAME[:CONFIG][@SPLIT]' source."""

    name: str
    config: str | None
    split: str


def parse_hf_source(source: str) -> HFSource:
    """'hf:NAME[:CONFIG][@SPLIT]' -> HFSource (config None when absent, split "train")."""
    body = source[len(HF_PREFIX) :]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise ValueError(
            f"bad dataset source {source!r}; expected '{HF_PREFIX}NAME[:CONFIG][@SPLIT]'"
        )
    return HFSource(name, config or None, split or "train")


def _iter_hf(source: str, text_field: str) -> Iterator[str]:
    """Stream a Hugging Face dataset (`streaming=True`: rows arrive as they download)."""
    name, config, split = parse_hf_source(source)
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"{source} needs the `datasets` package: pip install 'xdlm[hf]'") from err
    for row in datasets.load_dataset(name, config, split=split, streaming=True):
        if text_field not in row:
            raise ValueError(
                f"dataset {source} has no column {text_field!r} (columns: {sorted(row)}); "
                "pass text_field=<name>"
            )
        yield from _kept([row[text_field]])
