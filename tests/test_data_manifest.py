"""`manifest.json` at its limits (issue 29): every value `check_values` trusts exactly at its
bound and one past, the storage dtype at the uint16 / uint32 boundary, the format version, and
the exact one-line messages naming the file. Through `load_manifest` (what every reader calls)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from xdlm.data.manifest import MANIFEST_FILE, Manifest, SplitInfo, load_manifest, storage_dtype


def _manifest(**changes) -> Manifest:
    split = SplitInfo(file="train.bin", rows=4, tokens=100, documents=2, sha256="0" * 64)
    fields = dict(
        tokenizer={"kind": "char"}, vocab_size=10, mask_id=9, pad_id=None, bos_id=None,
        eos_id=None, seq_len=32, mode="wrap", dtype="uint16", splits={"train": split},
        sources=["c.txt"], seed=0, library_version="0",
    )  # fmt: skip
    return Manifest(**{**fields, **changes})


def _write(directory, manifest: Manifest, **raw):
    directory.mkdir(exist_ok=True)
    data = {**dataclasses.asdict(manifest), **raw}
    (directory / MANIFEST_FILE).write_text(json.dumps(data))
    return directory / MANIFEST_FILE


def _refusal(tmp_path, manifest: Manifest) -> str:
    path = _write(tmp_path / "d", manifest)
    with pytest.raises(ValueError) as err:
        load_manifest(tmp_path / "d")
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert message.endswith("; the file was edited, prepare the data again")
    return message[len(f"{path}: ") : -len("; the file was edited, prepare the data again")]


def test_a_written_manifest_loads_back_equal(tmp_path):
    split = SplitInfo("train.bin", 1, 0, 0, "", lengths_file="l.npy")
    m = _manifest(pad_id=0, bos_id=1, eos_id=2, mode="pad", splits={"train": split})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / MANIFEST_FILE).write_text(m.to_json())
    assert load_manifest(tmp_path / "d") == m
    assert m.to_json().endswith("}\n") and json.loads(m.to_json())["format_version"] == 1


def test_a_directory_without_a_manifest_is_not_a_prepared_dataset(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_manifest(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} is not a prepared dataset (no manifest.json); create one with "
        "`xdlm prepare` or xdlm.data.prepare(inputs, out_dir, ...)"
    )


@pytest.mark.parametrize("version", [0, 2, None, "1"])
def test_another_format_version_is_refused(tmp_path, version):
    path = _write(tmp_path / "d", _manifest(), format_version=version)
    with pytest.raises(ValueError) as err:
        load_manifest(tmp_path / "d")
    assert str(err.value) == (
        f"{path} has format_version {version!r}, this library reads 1; prepare the dataset "
        "again with this version"
    )


@pytest.mark.parametrize(
    ("changes", "ok"),
    [
        ({"vocab_size": 2, "mask_id": 1}, True),
        ({"vocab_size": 1, "mask_id": 0}, False),
        ({"seq_len": 1}, True),
        ({"seq_len": 0}, False),
    ],
)
def test_vocab_size_and_seq_len_at_their_minimum(tmp_path, changes, ok):
    m = _manifest(**changes)
    if ok:
        _write(tmp_path / "d", m)
        assert load_manifest(tmp_path / "d") == m
    else:
        assert _refusal(tmp_path, m) == (
            f"vocab_size / seq_len = {m.vocab_size} / {m.seq_len} (need >= 2 / >= 1)"
        )


@pytest.mark.parametrize("role", ["mask", "pad", "bos", "eos"])
@pytest.mark.parametrize(("value", "ok"), [(0, True), (9, True), (10, False), (-1, False)])
def test_each_special_id_is_in_zero_to_vocab_size(tmp_path, role, value, ok):
    m = _manifest(
        **{f"{role}_id": value}, **({"mode": "pad", "splits": {}} if role == "pad" else {})
    )
    if ok:
        _write(tmp_path / "d", m)
        assert getattr(load_manifest(tmp_path / "d"), f"{role}_id") == value
    else:
        assert _refusal(tmp_path, m) == f"{role}_id = {value} is outside [0, vocab_size=10)"


@pytest.mark.parametrize(("vocab_size", "dtype"), [(65535, "uint16"), (65536, "uint32")])
def test_the_storage_dtype_switches_past_65535_ids(tmp_path, vocab_size, dtype):
    assert storage_dtype(vocab_size) == dtype
    other = {"uint16": "uint32", "uint32": "uint16"}[dtype]
    m = _manifest(vocab_size=vocab_size, dtype=dtype)
    _write(tmp_path / "d", m)
    assert load_manifest(tmp_path / "d") == m
    assert _refusal(tmp_path, _manifest(vocab_size=vocab_size, dtype=other)) == (
        f"dtype = {other!r}, but shards of vocab_size={vocab_size} are written as {dtype!r}"
    )


def test_an_int16_dtype_of_the_same_size_is_refused(tmp_path):
    assert _refusal(tmp_path, _manifest(dtype="int16")) == (
        "dtype = 'int16', but shards of vocab_size=10 are written as 'uint16'"
    )


def test_an_unknown_mode_is_refused(tmp_path):
    assert _refusal(tmp_path, _manifest(mode="chunk")) == "mode = 'chunk' is not 'wrap' or 'pad'"


@pytest.mark.parametrize(
    ("mode", "rows", "lengths_file", "ok"),
    [
        ("wrap", 1, None, True),
        ("wrap", 0, None, False),
        ("wrap", 4, "train.lengths.npy", False),
        ("pad", 4, "train.lengths.npy", True),
        ("pad", 0, "train.lengths.npy", False),
        ("pad", 4, None, False),
    ],
)
def test_each_split_fits_the_mode(tmp_path, mode, rows, lengths_file, ok):
    split = SplitInfo("valid.bin", rows, 0, 0, "", lengths_file=lengths_file)
    good = SplitInfo("train.bin", 4, 0, 0, "", lengths_file=None if mode == "wrap" else "l.npy")
    m = _manifest(mode=mode, splits={"train": good, "valid": split})
    if ok:
        _write(tmp_path / "d", m)
        assert load_manifest(tmp_path / "d").splits["valid"] == split
    else:
        assert _refusal(tmp_path, m) == (
            f"splits.valid (rows {rows}, lengths_file {lengths_file!r}) does not fit mode={mode!r} "
            "(rows >= 1, a lengths file in pad mode only)"
        )


def test_a_manifest_that_is_not_json_or_has_foreign_keys_is_named(tmp_path):
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / MANIFEST_FILE
    path.write_text("{not json")
    with pytest.raises(ValueError) as err:
        load_manifest(tmp_path / "d")
    assert str(err.value).startswith(
        f"{path} (the manifest of a prepared dataset) is not valid JSON ("
    )
    _write(tmp_path / "d", _manifest(), extra=1)
    with pytest.raises(ValueError) as err:
        load_manifest(tmp_path / "d")
    assert str(err.value).startswith(f"{path}: unknown key(s) ['extra']")
    _write(tmp_path / "d", _manifest(), seq_len="32")
    with pytest.raises(ValueError) as err:
        load_manifest(tmp_path / "d")
    assert str(err.value) == f"{path}: seq_len must be int, got '32'"
    with pytest.raises(ValueError, match=r"^manifest.json: unknown key\(s\) \['extra'\]"):
        Manifest.from_dict({**dataclasses.asdict(_manifest()), "extra": 1})
