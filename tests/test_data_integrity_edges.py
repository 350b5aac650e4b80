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
