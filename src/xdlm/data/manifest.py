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

from xdlm.files import from_json_dict, read_json

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
    def from_dict(cls, data: dict, where: str = MANIFEST_FILE) -> Manifest:
        """Every key and type checked (`from_json_dict`); ValueError naming `where`."""
        return from_json_dict(cls, data, where)


def storage_dtype(vocab_size: int) -> str:
    """The shard dtype every writer uses for ids in [0, vocab_size)."""
    return "uint16" if vocab_size <= 65535 else "uint32"


def load_manifest(directory: str | Path) -> Manifest:
    """Read `directory/manifest.json`, its keys, types and values checked (`check_values`);
    FileNotFoundError if it is not a prepared dataset."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a prepared dataset (no {MANIFEST_FILE}); create one with "
            "`xdlm prepare` or xdlm.data.prepare(inputs, out_dir, ...)"
        )
    data = read_json(path, "the manifest of a prepared dataset")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {data.get('format_version')!r}, this library reads "
            f"{FORMAT_VERSION}; prepare the dataset again with this version"
        )
    manifest = Manifest.from_dict(data, str(path))
    check_values(manifest, path)
    return manifest


def check_values(m: Manifest, path: Path) -> None:
    """The fields the readers trust, against each other: V >= 2, special ids in [0, V), the
    shard dtype the writers use for V (a float16 or int16 dtype of the same item size would
    read other ids from the same bytes), the mode and its lengths files, positive sizes (an
    empty split included: no writer makes one)."""

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{path}: {field} {why}; the file was edited, prepare the data again")

    if m.vocab_size < 2 or m.seq_len < 1:
        raise bad("vocab_size / seq_len", f"= {m.vocab_size} / {m.seq_len} (need >= 2 / >= 1)")
    for role in ("mask", "pad", "bos", "eos"):
        value = getattr(m, f"{role}_id")
        if value is not None and not 0 <= value < m.vocab_size:
            raise bad(f"{role}_id", f"= {value} is outside [0, vocab_size={m.vocab_size})")
    if m.dtype != storage_dtype(m.vocab_size):
        raise bad("dtype", f"= {m.dtype!r}, but shards of vocab_size={m.vocab_size} are written "
                  f"as {storage_dtype(m.vocab_size)!r}")  # fmt: skip
    if m.mode not in ("wrap", "pad"):
        raise bad("mode", f"= {m.mode!r} is not 'wrap' or 'pad'")
    for name, info in m.splits.items():  # the writers never write an empty split
        if info.rows < 1 or (info.lengths_file is None) != (m.mode == "wrap"):
            raise bad(f"splits.{name}", f"(rows {info.rows}, lengths_file "
                      f"{info.lengths_file!r}) does not fit mode={m.mode!r} (rows >= 1, a "
                      "lengths file in pad mode only)")  # fmt: skip


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
