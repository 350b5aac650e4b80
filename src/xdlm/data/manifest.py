"""The `manifest.json` of a prepared dataset directory, and its checks.

A prepared directory holds:
  manifest.json        this file (tokenizer spec, special ids, seq_len, mode, dtype, splits)
  tokenizer/           the saved `TextTokenizer` (`load_tokenizer_dir`)
  {split}.bin          raw row-major memmap, shape (rows, seq_len), dtype `manifest.dtype`
  {split}.lengths.npy  (pad mode only) int64 (rows,), real tokens per row; the rest is pad_id
  {split}.labels.npy   (labelled data, e.g. images) int64 (rows,), the class of each row
Image-token datasets (`xdlm.data.images`) have no tokenizer/ directory, `pad_id`, `bos_id` and
`eos_id` None, and `image` = {"kind", "height", "width", "levels", "num_classes"}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """One split: `rows` x `seq_len` ids in `file`; `tokens` = non-pad ids; `documents` read."""

    file: str
    rows: int
    tokens: int
    documents: int
    sha256: str
    lengths_file: str | None = None
    labels_file: str | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything needed to read a prepared dataset and to rebuild its tokenizer."""

    tokenizer: dict
    vocab_size: int
    mask_id: int
    pad_id: int | None
    bos_id: int | None
    eos_id: int | None
    seq_len: int
    mode: str
    dtype: str
    splits: dict[str, SplitInfo]
    sources: list[str]
    seed: int
    library_version: str
    format_version: int = FORMAT_VERSION
    image: dict | None = None
    tokenizer_sha256: str | None = None  # TextTokenizer.fingerprint(); None: image tokens / old

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        splits = {name: SplitInfo(**info) for name, info in data["splits"].items()}
        return cls(**{**data, "splits": splits})


def load_manifest(directory: str | Path) -> Manifest:
    """Read `directory/manifest.json`; FileNotFoundError if it is not a prepared dataset."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a prepared dataset (no {MANIFEST_FILE}); create one with "
            "`xdlm prepare` or xdlm.data.prepare(inputs, out_dir, ...)"
        )
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {data.get('format_version')!r}, this library reads "
            f"{FORMAT_VERSION}; prepare the dataset again with this version"
        )
    return Manifest.from_dict(data)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
