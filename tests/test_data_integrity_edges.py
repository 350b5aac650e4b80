"""data/integrity.py at its limits (issue 29): the cheap-check size exactly and one byte past,
`xdlm verify` hashing every byte of a file above that size, row lengths and ids at their bounds.
The fault-injection tests (truncation, foreign tokenizer, per-batch ids): test_integrity.py."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from xdlm.cli import main
from xdlm.data import integrity
from xdlm.data.integrity import check_ids
from xdlm.data.loader import TokenShards
from xdlm.data.manifest import load_manifest, sha256_file
from xdlm.data.prepare import prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    text = tmp_path_factory.mktemp("corpus") / "c.txt"
    text.write_text("".join(f"line {i}: the quick brown fox.\n\n" for i in range(300)))
    out = tmp_path_factory.mktemp("prep")
    for mode in ("wrap", "pad"):
        prepare([text], out / mode, tokenizer="char", seq_len=32, mode=mode, valid_fraction=0.0)
    return out


@pytest.fixture
def wrap(prepared, tmp_path):
    import shutil

    return shutil.copytree(prepared / "wrap", tmp_path / "wrap")


def _change_last_token(directory):
    """The last token of train.bin replaced by another valid id (only the hash can tell)."""
    m = load_manifest(directory)
    tokens = np.memmap(directory / "train.bin", dtype=m.dtype, mode="r+")
    tokens[-1] = (int(tokens[-1]) + 1) % m.vocab_size
    tokens.flush()
    return (directory / "train.bin").stat().st_size


def test_load_hashes_a_file_exactly_at_the_cheap_size_not_one_byte_past(wrap, monkeypatch):
    size = _change_last_token(wrap)
    monkeypatch.setattr(integrity, "CHEAP_BYTES", size)
    with pytest.raises(ValueError, match="train.bin fails its sha256 check"):
        TokenShards(wrap, "train")
    monkeypatch.setattr(integrity, "CHEAP_BYTES", size - 1)
    assert TokenShards(wrap, "train").rows([0]).tokens.shape == (1, 32)  # cheap check: loads


def test_verify_hashes_every_byte_of_a_file_above_the_cheap_size(wrap, monkeypatch, capsys):
    assert main(["verify", str(wrap)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(integrity, "CHEAP_BYTES", 0)  # every file is "large"
    monkeypatch.setattr(integrity, "SAMPLE_ROWS", 1)
    _change_last_token(wrap)
    assert main(["verify", str(wrap)]) == 2
    assert "train.bin fails its sha256 check" in capsys.readouterr().err


def test_sha256_file_reads_past_its_first_chunk(tmp_path):
    data = bytes(range(256)) * 3
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=7) == hashlib.sha256(data).hexdigest()
    (tmp_path / "f").write_bytes(data[:-1] + b"\x00")
    assert sha256_file(tmp_path / "f", chunk=7) == hashlib.sha256(data[:-1] + b"\x00").hexdigest()


@pytest.mark.parametrize(("edit", "ok"), [(0, False), (1, True), (32, True), (33, False)])
def test_row_lengths_are_accepted_in_one_to_seq_len(prepared, tmp_path, edit, ok):
    import shutil

    pad = shutil.copytree(prepared / "pad", tmp_path / "pad")
    lengths = np.load(pad / "train.lengths.npy")
    lengths[len(lengths) // 2] = edit
    np.save(pad / "train.lengths.npy", lengths)
    if ok:  # the row's mask: exactly its length, as a prefix
        mask = TokenShards(pad, "train").rows([len(lengths) // 2]).attention_mask
        assert mask.sum() == edit and mask[0, :edit].all()
    else:
        with pytest.raises(ValueError, match=r"lengths must be in \[1, 32\], got"):
            TokenShards(pad, "train")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_ids_are_accepted_below_the_vocabulary_size_only(dtype):
    check_ids(np.array([[0, 9]], dtype=dtype), 10, "x")
    with pytest.raises(ValueError, match=r"x: row 3 holds id 10, outside \[0, vocab_size=10\)"):
        check_ids(np.array([[9, 9], [1, 10]], dtype=dtype), 10, "x", first_row=2)
    if dtype == np.int32:
        with pytest.raises(ValueError, match="holds id -1"):
            check_ids(np.array([[-1, 0]], dtype=dtype), 10, "x")


# ------------------------------------------------------------- rows named by their file row
_IDS_FIX = (
    "; the file was edited or written for another tokenizer. Prepare the data again "
    "(xdlm prepare) and check it with `xdlm verify DIR`"
)


def test_an_out_of_range_id_is_named_by_its_row_in_the_file():
    tokens = np.array([[1], [10]], dtype=np.uint16)
    with pytest.raises(ValueError) as err:
        check_ids(tokens[1:], 10, "x")
    assert str(err.value) == "x: row 0 holds id 10, outside [0, vocab_size=10)" + _IDS_FIX
    with pytest.raises(ValueError, match=r"^x: row 40 holds id 10,"):  # gathered rows 7, 40
        check_ids(tokens, 10, "x", row_ids=np.array([7, 40]))
    check_ids(np.zeros((0, 4), dtype=np.uint16), 10, "x")  # nothing to check


def _set_token(directory, row, value):
    m = load_manifest(directory)
    tokens = np.memmap(directory / "train.bin", dtype=m.dtype, mode="r+").reshape(-1, m.seq_len)
    tokens[row, 3] = value
    tokens.flush()
    return m


@pytest.mark.parametrize("row", ["first", 5, "last"])
def test_the_full_check_reads_every_chunk(wrap, monkeypatch, row):
    m = load_manifest(wrap)
    rows = m.splits["train"].rows
    row = {"first": 0, "last": rows - 1}.get(row, row)
    _set_token(wrap, row, m.vocab_size)
    monkeypatch.setattr(integrity, "_CHUNK_ROWS", 2)
    with pytest.raises(ValueError) as err:
        integrity.check_split(wrap, m, "train", full=True)
    assert str(err.value).startswith(
        f"{wrap / 'train.bin'}: row {row} holds id {m.vocab_size}, outside [0, vocab_size="
    )


@pytest.mark.parametrize("row", ["first", "last"])
def test_the_sampled_check_reads_the_first_and_last_rows(wrap, monkeypatch, row):
    m = load_manifest(wrap)
    row = {"first": 0, "last": m.splits["train"].rows - 1}[row]
    _set_token(wrap, row, m.vocab_size)
    monkeypatch.setattr(integrity, "CHEAP_BYTES", 0)
    monkeypatch.setattr(integrity, "SAMPLE_ROWS", 3)
    with pytest.raises(ValueError, match=rf"train.bin \(sampled rows\): row {row} holds id"):
        integrity.check_split(wrap, m, "train")


def test_the_sample_is_every_row_when_sample_rows_reaches_the_row_count(wrap, monkeypatch):
    m = _set_token(wrap, 1, 500)
    monkeypatch.setattr(integrity, "CHEAP_BYTES", 0)
    monkeypatch.setattr(integrity, "SAMPLE_ROWS", m.splits["train"].rows)
    with pytest.raises(ValueError, match=r"train.bin \(sampled rows\): row 1 holds id 500"):
        integrity.check_split(wrap, m, "train")


def test_a_bad_row_outside_the_sample_is_caught_in_its_batch(wrap, monkeypatch):
    m = _set_token(wrap, 1, 500)
    monkeypatch.setattr(integrity, "CHEAP_BYTES", 0)
    monkeypatch.setattr(integrity, "SAMPLE_ROWS", 3)  # rows 0, middle, last
    shards = TokenShards(wrap, "train")
    assert shards.rows([0, 2]).tokens.shape == (2, 32)
    with pytest.raises(ValueError) as err:
        shards.rows([3, 0, 1])  # the bad row is the batch's third: named as file row 1
    assert str(err.value).startswith(f"{wrap / 'train.bin'}: row 1 holds id 500, outside")
    assert m.vocab_size < 500


# ------------------------------------------------------------- missing, truncated, foreign files
def test_a_missing_or_truncated_token_file_is_named(wrap):
    m = load_manifest(wrap)
    path, info = wrap / "train.bin", m.splits["train"]
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(ValueError) as err:
        integrity.check_split(wrap, m, "train")
    assert str(err.value) == (
        f"split 'train': {path} has {len(data) - 1} bytes, the manifest says {len(data)} "
        f"({info.rows} rows x 32 x uint16); the file is truncated or foreign, prepare the data "
        "again"
    )
    path.unlink()
    with pytest.raises(FileNotFoundError) as err:
        integrity.check_split(wrap, m, "train")
    assert str(err.value) == f"split 'train': {path} is missing; prepare the data again"


def test_a_changed_file_fails_its_hash_with_one_line(wrap):
    size = _change_last_token(wrap)
    with pytest.raises(ValueError) as err:
        integrity.check_split(wrap, load_manifest(wrap), "train", full=True)
    assert str(err.value) == (
        f"split 'train': {wrap / 'train.bin'} fails its sha256 check; the file changed after "
        "preparation, prepare the data again"
    )
    assert size > 0


@pytest.fixture
def pad(prepared, tmp_path):
    import shutil

    return shutil.copytree(prepared / "pad", tmp_path / "pad")


def test_the_checked_split_returns_the_per_row_arrays(wrap, pad):
    import dataclasses

    assert integrity.check_split(wrap, load_manifest(wrap), "train") == (
        integrity.CheckedSplit(None, None)
    )
    m = load_manifest(pad)
    checked = integrity.check_split(pad, m, "train")
    assert np.array_equal(checked.lengths, np.load(pad / "train.lengths.npy"))
    assert checked.labels is None
    rows = m.splits["train"].rows
    np.save(pad / "train.labels.npy", np.arange(rows) % 10)
    info = dataclasses.replace(m.splits["train"], labels_file="train.labels.npy")
    labelled = dataclasses.replace(m, splits={"train": info})
    assert np.array_equal(
        integrity.check_split(pad, labelled, "train").labels, np.arange(rows) % 10
    )
    (pad / "train.labels.npy").unlink()
    with pytest.raises(FileNotFoundError) as err:
        integrity.check_split(pad, labelled, "train")
    assert str(err.value) == (
        f"{pad / 'train.labels.npy'} (row labels) is missing; prepare the data again"
    )


@pytest.mark.parametrize("kind", ["missing", "object", "float", "shape", "truncated"])
def test_a_bad_lengths_file_is_named(pad, kind):
    path, m = pad / "train.lengths.npy", load_manifest(pad)
    rows = m.splits["train"].rows
    lengths = np.load(path)
    if kind == "missing":
        path.unlink()
    elif kind == "object":  # a pickle inside .npy: never unpickled
        np.save(path, np.array([[1]] * rows, dtype=object).reshape(rows), allow_pickle=True)
    elif kind == "float":
        np.save(path, lengths.astype(np.float64))
    elif kind == "shape":
        np.save(path, np.append(lengths, 1))
    else:
        path.write_bytes(path.read_bytes()[:-3])
    error = FileNotFoundError if kind == "missing" else ValueError
    with pytest.raises(error) as err:
        integrity.check_split(pad, m, "train")
    text = str(err.value)
    if kind == "missing":
        assert text == f"{path} (row lengths) is missing; prepare the data again"
    elif kind in ("object", "truncated"):
        assert text.startswith(f"{path} (row lengths) is truncated or corrupt (")
        assert text.endswith("); prepare again")
    else:
        dtype, shape = ("float64", (rows,)) if kind == "float" else ("int64", (rows + 1,))
        assert text == (
            f"{path} (row lengths) has shape {shape} / dtype {dtype}, the manifest says "
            f"({rows},) integers; the file is truncated or foreign, prepare the data again"
        )


# ------------------------------------------------------------- the manifest against the tokenizer
def _tokenless(tmp_path, **changes):
    import dataclasses

    from xdlm.data.manifest import Manifest

    fields = dict(
        tokenizer={"kind": "image"}, vocab_size=17, mask_id=16, pad_id=None, bos_id=None,
        eos_id=None, seq_len=4, mode="wrap", dtype="uint16", splits={}, sources=[], seed=0,
        library_version="0", image={"levels": 16},
    )  # fmt: skip
    return dataclasses.replace(Manifest(**fields), **changes)


@pytest.mark.parametrize(
    ("changes", "ids"),
    [
        ({}, 16),
        ({"image": None, "tokenizer": {"kind": "hmm", "law": {"emission": [[0.5] * 16]}}}, 16),
        ({"image": None, "tokenizer": {"kind": "hmm"}, "vocab_size": 1, "mask_id": 0}, 0),
    ],
)
def test_tokenless_data_have_mask_id_last(tmp_path, changes, ids):
    """Image tokens and synthetic HMM data: V = ids + 1 and the mask id is V − 1."""
    m = _tokenless(tmp_path, **changes)
    integrity.check_vocabulary(tmp_path, m)
    for field, wrong in (("vocab_size", m.vocab_size + 1), ("mask_id", m.mask_id - 1)):
        edited = _tokenless(tmp_path, **{**changes, field: wrong})
        with pytest.raises(ValueError) as err:
            integrity.check_vocabulary(tmp_path, edited)
        right = {"vocab_size": ids + 1, "mask_id": ids}[field]
        assert str(err.value) == (
            f"{tmp_path / 'manifest.json'}: {field}={wrong} but its data have {ids} token ids "
            f"(so {field}={right}); the manifest was edited, prepare the data again"
        )


def test_a_text_dataset_without_its_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        integrity.check_vocabulary(tmp_path, _tokenless(tmp_path, image=None, tokenizer={}))
    assert str(err.value) == (
        f"{tmp_path / 'tokenizer'} is missing: a text dataset keeps its tokenizer there; "
        "prepare the data again"
    )


@pytest.mark.parametrize("field", ["vocab_size", "mask_id", "pad_id", "tokenizer_sha256"])
def test_a_manifest_that_disagrees_with_its_tokenizer_is_refused(wrap, field):
    import dataclasses

    m = load_manifest(wrap)
    integrity.check_vocabulary(wrap, m)
    integrity.check_vocabulary(wrap, dataclasses.replace(m, tokenizer_sha256=None))  # older data
    if field == "tokenizer_sha256":
        with pytest.raises(ValueError) as err:
            integrity.check_vocabulary(wrap, dataclasses.replace(m, tokenizer_sha256="ab" * 32))
        assert str(err.value) == (
            f"{wrap / 'tokenizer'} has fingerprint {m.tokenizer_sha256[:12]}, the manifest "
            "records abababababab; the tokenizer was replaced after preparation, prepare the "
            "data again"
        )
        return
    wrong = (getattr(m, field) or 0) + 1
    with pytest.raises(ValueError) as err:
        integrity.check_vocabulary(wrap, dataclasses.replace(m, **{field: wrong}))
    assert str(err.value) == (
        f"{wrap / 'manifest.json'}: {field}={wrong} but the saved tokenizer {wrap / 'tokenizer'} "
        f"has {field}={getattr(m, field)}; the manifest was edited, prepare the data again"
    )


def test_data_and_a_run_must_share_the_tokenizer(wrap):
    """The manifest's fingerprint decides (else that of the saved tokenizer/); image tokens
    (no tokenizer on a side) are not compared."""
    import json

    from xdlm.data.tokenizers import load_tokenizer, load_tokenizer_dir

    own, other = (
        load_tokenizer_dir(wrap / "tokenizer"),
        load_tokenizer("char", corpus_texts=["xyz"]),
    )
    integrity.check_same_tokenizer(own, wrap, "the run R")
    integrity.check_same_tokenizer(None, wrap, "the run R")
    with pytest.raises(ValueError) as err:
        integrity.check_same_tokenizer(other, wrap, "the run R")
    assert str(err.value) == (
        f"{wrap} was tokenized with a different tokenizer (fingerprint "
        f"{own.fingerprint()[:12]}) than the run R (fingerprint {other.fingerprint()[:12]}), "
        "though the vocabulary sizes may agree; the result would be meaningless. Use data "
        "prepared with the run's tokenizer: xdlm.data.prepare(inputs, out, "
        "tokenizer=load_tokenizer_dir('RUN_DIR/tokenizer'))"
    )
    other.save(wrap / "tokenizer")  # replaced after preparation: the manifest's record wins
    integrity.check_same_tokenizer(own, wrap, "the run R")
    manifest = json.loads((wrap / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = None  # older data: the saved tokenizer/ decides
    (wrap / "manifest.json").write_text(json.dumps(manifest))
    integrity.check_same_tokenizer(other, wrap, "the run R")
    with pytest.raises(ValueError, match="was tokenized with a different tokenizer"):
        integrity.check_same_tokenizer(own, wrap, "the run R")
    import shutil

    shutil.rmtree(wrap / "tokenizer")  # no tokenizer on the data's side: nothing to compare
    integrity.check_same_tokenizer(own, wrap, "the run R")
