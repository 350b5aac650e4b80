"""Integrity checks of a prepared dataset: what `TokenShards` checks at load, `verify_dataset`
(`xdlm verify DIR`) checks in full.

At load (every `TokenShards`), cheap and always: the `.bin` file has exactly rows × L × itemsize
bytes, the lengths / labels files load and have one entry per row (lengths in [1, L]), and ids
are < vocab_size: over the whole file when it is at most `CHEAP_BYTES` (a chunked vectorised max
over the memmap), else on `SAMPLE_ROWS` evenly spaced rows, and then on every batch as it is read
(`check_ids`), so an out-of-range id never reaches the embedding. The SHA-256 is checked at load
when the file is at most `CHEAP_BYTES`; `verify_dataset` checks it, and every id, always.

Every load also checks the manifest's fields against what they can be checked against
(`check_vocabulary`): vocab_size, mask / pad / BOS / EOS ids and the fingerprint against the saved
tokenizer (the dtype and the other fields against each other: `manifest.check_values`).

The tokenizer fingerprint (`TextTokenizer.fingerprint`) is recorded in the manifest by `prepare`
and in a run's checkpoints; `check_same_tokenizer` refuses to mix data and a model whose
tokenizers differ (same vocabulary size or not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xdlm.data.manifest import MANIFEST_FILE, Manifest, load_manifest, sha256_file

CHEAP_BYTES = 64 * 1024 * 1024
SAMPLE_ROWS = 4096
_CHUNK_ROWS = 1 << 16


def check_ids(
    tokens: np.ndarray,
    vocab_size: int,
    where: str,
    first_row: int = 0,
    row_ids: np.ndarray | None = None,
) -> None:
    """ValueError naming `where` and the first row of `tokens` (n, L) holding an id outside
    [0, vocab_size), by its row in the file: `first_row` + its index (a slice of the file), or
    `row_ids[index]` (n,) for gathered rows (a batch, a sample)."""
    if tokens.size == 0:
        return
    bad = (
        (tokens >= vocab_size) | (tokens < 0) if tokens.dtype.kind == "i" else tokens >= vocab_size
    )
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        value = int(tokens[row][bad[row]][0])
        number = first_row + row if row_ids is None else int(row_ids[row])
        raise ValueError(
            f"{where}: row {number} holds id {value}, outside [0, vocab_size="
            f"{vocab_size}); the file was edited or written for another tokenizer. Prepare the "
            "data again (xdlm prepare) and check it with `xdlm verify DIR`"
        )


def _load_rowwise(path: Path, rows: int, what: str) -> np.ndarray:
    """A (rows,) `.npy` file, with errors naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} ({what}) is missing; prepare the data again")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"{path} ({what}) is truncated or corrupt ({err}); prepare again"
        ) from None
    if arr.shape != (rows,) or arr.dtype.kind not in "iu":
        raise ValueError(
            f"{path} ({what}) has shape {arr.shape} / dtype {arr.dtype}, the manifest says "
            f"({rows},) integers; the file is truncated or foreign, prepare the data again"
        )
    return arr


@dataclass(frozen=True)
class CheckedSplit:
    """The per-row arrays of a checked split: lengths (rows,) (pad mode) and labels (rows,)."""

    lengths: np.ndarray | None
    labels: np.ndarray | None


def check_split(
    directory: str | Path, manifest: Manifest, split: str, *, full: bool | None = None
) -> CheckedSplit:
    """The load-time checks of module docstring for one split; `full=True` (verify) hashes and
    scans every id whatever the size, `None` does so when the file is at most `CHEAP_BYTES`."""
    directory, info = Path(directory), manifest.splits[split]
    path = directory / info.file
    if not path.is_file():
        raise FileNotFoundError(f"split {split!r}: {path} is missing; prepare the data again")
    size = path.stat().st_size
    expected = info.rows * manifest.seq_len * np.dtype(manifest.dtype).itemsize
    if size != expected:
        raise ValueError(
            f"split {split!r}: {path} has {size} bytes, the manifest says {expected} "
            f"({info.rows} rows x {manifest.seq_len} x {manifest.dtype}); the file is truncated "
            "or foreign, prepare the data again"
        )
    full = size <= CHEAP_BYTES if full is None else full
    lengths = labels = None
    if info.lengths_file is not None:
        lengths = _load_rowwise(directory / info.lengths_file, info.rows, "row lengths")
        if lengths.min() < 1 or lengths.max() > manifest.seq_len:
            raise ValueError(
                f"{directory / info.lengths_file}: lengths must be in [1, {manifest.seq_len}], "
                f"got {lengths.min()}..{lengths.max()}; prepare the data again"
            )
    if info.labels_file is not None:
        labels = _load_rowwise(directory / info.labels_file, info.rows, "row labels")
    tokens = np.memmap(path, dtype=manifest.dtype, mode="r", shape=(info.rows, manifest.seq_len))
    if full:
        for start in range(0, info.rows, _CHUNK_ROWS):
            check_ids(tokens[start : start + _CHUNK_ROWS], manifest.vocab_size, str(path), start)
    else:
        rows = np.unique(np.linspace(0, info.rows - 1, SAMPLE_ROWS).astype(np.int64))
        check_ids(tokens[rows], manifest.vocab_size, f"{path} (sampled rows)", row_ids=rows)
    if full and sha256_file(path) != info.sha256:
        raise ValueError(
            f"split {split!r}: {path} fails its sha256 check; the file changed after "
            "preparation, prepare the data again"
        )
    return CheckedSplit(lengths, labels)


def check_vocabulary(directory: str | Path, manifest: Manifest) -> None:
    """The manifest's vocab_size and special ids against what they can be checked against:
    the saved tokenizer (its fingerprint, size and special ids) for text; for image tokens and
    synthetic data (no tokenizer) the writers' layout, V = data ids + 1 with the mask id last.
    ValueError naming manifest.json and the field."""
    path = Path(directory) / MANIFEST_FILE
    tok_dir = Path(directory) / "tokenizer"
    if manifest.tokenizer_sha256 is None and not tok_dir.is_dir():
        _check_tokenless(manifest, path)
        return
    from xdlm.data.tokenizers import load_tokenizer_dir

    tok = load_tokenizer_dir(tok_dir)
    found = tok.fingerprint()
    if manifest.tokenizer_sha256 not in (None, found):
        raise ValueError(
            f"{tok_dir} has fingerprint {found[:12]}, the manifest records "
            f"{manifest.tokenizer_sha256[:12]}; the tokenizer was replaced after "
            "preparation, prepare the data again"
        )
    fields = {"vocab_size": tok.vocab_size, **{f"{r}_id": i for r, i in tok.special_ids.items()}}
    for field, value in fields.items():
        if getattr(manifest, field) != value:
            raise ValueError(
                f"{path}: {field}={getattr(manifest, field)} but the saved tokenizer {tok_dir} "
                f"has {field}={value}; the manifest was edited, prepare the data again"
            )


def _check_tokenless(manifest: Manifest, path: Path) -> None:
    """Image tokens (`levels` data ids) and synthetic HMM data (D emission ids): V = ids + 1,
    mask id = V − 1."""
    spec = manifest.tokenizer
    if manifest.image is not None:
        ids = manifest.image.get("levels")
    elif spec.get("kind") == "hmm":
        ids = len(spec.get("law", {}).get("emission", [[]])[0])
    else:
        raise FileNotFoundError(
            f"{path.parent / 'tokenizer'} is missing: a text dataset keeps its tokenizer there; "
            "prepare the data again"
        )
    for field, value in {"vocab_size": ids + 1, "mask_id": ids}.items():
        if getattr(manifest, field) != value:
            raise ValueError(
                f"{path}: {field}={getattr(manifest, field)} but its data have {ids} token ids "
                f"(so {field}={value}); the manifest was edited, prepare the data again"
            )


def verify_dataset(directory: str | Path) -> Manifest:
    """Every check, in full: the manifest's fields (`load_manifest`, `check_vocabulary`), all
    splits (sizes, SHA-256, ids, lengths, labels). Returns the manifest."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    check_vocabulary(directory, manifest)
    for name in manifest.splits:
        check_split(directory, manifest, name, full=True)
    return manifest


def check_same_tokenizer(tokenizer, directory: str | Path, what: str) -> None:
    """ValueError unless `tokenizer` (a run's) tokenizes like the data in `directory` did:
    equal fingerprints (the manifest's, else that of the data's saved tokenizer/)."""
    manifest = load_manifest(directory)
    data_fp = manifest.tokenizer_sha256
    if data_fp is None and (Path(directory) / "tokenizer").is_dir():
        from xdlm.data.tokenizers import load_tokenizer_dir

        data_fp = load_tokenizer_dir(Path(directory) / "tokenizer").fingerprint()
    if tokenizer is None or data_fp is None:
        return  # image tokens: no text tokenizer on either side
    mine = tokenizer.fingerprint()
    if mine != data_fp:
        raise ValueError(
            f"{directory} was tokenized with a different tokenizer (fingerprint {data_fp[:12]}) "
            f"than {what} (fingerprint {mine[:12]}), though the vocabulary sizes may agree; "
            "the result would be meaningless. Use data prepared with the run's tokenizer: "
            "xdlm.data.prepare(inputs, out, tokenizer=load_tokenizer_dir('RUN_DIR/tokenizer'))"
        )
