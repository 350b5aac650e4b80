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
`iter_documents` reads any source lazily (bounded memory); `read_documents` lists it.
Empty documents are dropped everywhere.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

HF_PREFIX = "hf:"
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
_BLANK_CHARS = " \t\f\v"
_BLANK_LINES = re.compile(f"\\n[{_BLANK_CHARS}]*\\n")


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


def _iter_text(path: Path) -> Iterator[str]:
    """`split_documents` line by line: a line of only [ \t\f\v] ends the current document."""
    lines: list[str] = []
    with _open_text(path) as f:
        for line in f:
            if line.rstrip("\n").strip(_BLANK_CHARS):
                lines.append(line)
                continue
            doc = "".join(lines).strip()
            lines = []
            if doc:
                yield doc
    doc = "".join(lines).strip()
    if doc:
        yield doc


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
