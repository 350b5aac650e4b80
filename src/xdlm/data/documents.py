"""Reading raw text sources into documents (lists of strings).

The document rule, shared by data preparation and zero-shot evaluation:
  - `.txt` / `.txt.gz`: the file is split at blank lines (lines holding only whitespace); each
    run of non-blank lines is one document, kept verbatim (inner line breaks included) except
    that `\\r\\n` becomes `\\n` and the run's outer whitespace is stripped. A file without blank
    lines is therefore ONE document.
  - `.jsonl` / `.jsonl.gz`: one JSON object per line; its `text_field` (default "text") is one
    document.
  - `.parquet`: each row's `text_field` column value is one document (needs `pyarrow`).
  - `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset via `datasets.load_dataset` (needs
    internet); each row's `text_field` is one document; SPLIT defaults to "train".
Empty documents are dropped everywhere.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import NamedTuple

HF_PREFIX = "hf:"
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n")


def split_documents(text: str) -> list[str]:
    """Split text at blank lines into stripped, non-empty documents (see module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [d.strip() for d in _BLANK_LINES.split(text) if d.strip()]


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Read one source (`.txt[.gz]`, `.jsonl[.gz]`, `.parquet` or `hf:` name) into documents."""
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        return _read_hf(path, text_field)
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
    try:
        if name.endswith((".txt", ".txt.gz")):
            return split_documents(_read_text(path))
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(path, text_field)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.object[err.start : err.start + 1]!r} cannot be "
            "decoded); convert it, e.g. iconv -f latin1 -t utf-8, or leave the binary file out"
        ) from None
    except gzip.BadGzipFile as err:
        raise ValueError(f"{path} is not a valid gzip file ({err}); recompress it") from None
    if name.endswith(".parquet"):
        return _read_parquet(path, text_field)
    raise ValueError(f"unsupported input {path}: expected a file ending in {', '.join(SUFFIXES)}")


def _read_text(path: Path) -> str:
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
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
            kind = type(record[text_field]).__name__
            if not isinstance(record[text_field], str | None):
                raise ValueError(
                    f"{path}:{lineno}: field {text_field!r} is a {kind}, not a string; fix the "
                    "line or pass another text_field"
                )
            docs.append(record[text_field])
    return [d.strip() for d in docs if d and d.strip()]


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise ValueError(
            f"{path} has no column {text_field!r} (columns: {table.column_names}); "
            "pass text_field=<name>"
        )
    return [d.strip() for d in table.column(text_field).to_pylist() if d and d.strip()]


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


def _read_hf(source: str, text_field: str) -> list[str]:
    name, config, split = parse_hf_source(source)
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"{source} needs the `datasets` package: pip install 'xdlm[hf]'") from err
    dataset = datasets.load_dataset(name, config, split=split)
    if text_field not in dataset.column_names:
        raise ValueError(
            f"dataset {source} has no column {text_field!r} (columns: {dataset.column_names}); "
            "pass text_field=<name>"
        )
    return [d.strip() for d in dataset[text_field] if d and d.strip()]
