import gzip
import json
import os

import numpy as np
import pytest

from xdlm.data import (
    embedded_corpus_path,
    load_manifest,
    load_tokenizer,
    load_tokenizer_dir,
    prepare,
    read_documents,
    split_documents,
    split_indices,
    verify,
)
from xdlm.data.documents import parse_hf_source
from xdlm.data.manifest import sha256_file


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return read_documents(embedded_corpus_path())[:240]


@pytest.fixture
def corpus_file(tmp_path, docs):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _rows(out, manifest, split):
    info = manifest.splits[split]
    data = np.fromfile(out / info.file, dtype=manifest.dtype)
    return data.reshape(info.rows, manifest.seq_len).astype(np.int64)


def _stream(tok, texts):
    return np.concatenate([[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode_batch(texts)])


def test_split_documents_rule():
    text = "a b\nc\n\n \t\n\nd\r\n\r\ne\n\n\n"
    assert split_documents(text) == ["a b\nc", "d", "e"]
    assert split_documents("one\ntwo\nthree\n") == ["one\ntwo\nthree"]
    assert split_documents("\n \n") == []


def test_read_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("x\n\ny z\n")
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("x\n\ny z\n")
    lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(["x", " ", "y z"])]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    for name in ("a.txt", "a.txt.gz"):
        assert read_documents(tmp_path / name) == ["x", "y z"]
    assert read_documents(tmp_path / "a.jsonl", text_field="body") == ["x", "y z"]
    with pytest.raises(ValueError, match="no field 'text'.*text_field"):
        read_documents(tmp_path / "a.jsonl")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["x", "", "y z"]}), tmp_path / "a.parquet")
    assert read_documents(tmp_path / "a.parquet") == ["x", "y z"]


def test_hf_source(monkeypatch):
    datasets = pytest.importorskip("datasets")
    assert parse_hf_source("hf:wikitext:wikitext-2-raw-v1@test") == (
        "wikitext", "wikitext-2-raw-v1", "test"
    )  # fmt: skip
    calls = []

    def fake_load(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "a"}, {"text": ""}, {"text": " b "}, {"text": None}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert read_documents("hf:org/corpus") == ["a", "b"]
    assert calls == [("org/corpus", None, "train", True)]  # streamed, never loaded whole
    with pytest.raises(ValueError, match="no column 'body'.*text_field"):
        read_documents("hf:org/corpus", text_field="body")


def test_split_indices_disjoint_and_deterministic():
    parts = split_indices(100, 0.1, None, seed=3)
    assert len(parts["valid"]) == 10 and len(parts["train"]) == 90
    assert set(parts["train"]).isdisjoint(parts["valid"])
    assert sorted([*parts["train"], *parts["valid"]]) == list(range(100))
    again = split_indices(100, 0.1, None, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert not np.array_equal(parts["valid"], split_indices(100, 0.1, None, seed=4)["valid"])
    assert len(split_indices(100, 0.5, 7, seed=0)["valid"]) == 7
    assert "valid" not in split_indices(100, 0.0, None, seed=0)


def test_wrap_rows_are_the_document_stream(tmp_path, corpus_file, docs):
    out = tmp_path / "wrap"
    m = prepare(corpus_file, out, tokenizer="char", seq_len=64, valid_fraction=0.1, seed=1)
    tok = load_tokenizer_dir(out / "tokenizer")
    parts = split_indices(len(docs), 0.1, None, seed=1)
    for split, idx in parts.items():
        rows = _rows(out, m, split)
        stream = _stream(tok, [docs[i] for i in idx])
        assert rows.shape == (len(stream) // 64, 64)
        assert np.array_equal(rows.reshape(-1), stream[: rows.size])
        assert not (rows == tok.pad_id).any() and not (rows == tok.mask_id).any()
        assert (rows == tok.bos_id).any() and (rows == tok.eos_id).any()
        assert m.splits[split].documents == len(idx)
        assert m.splits[split].tokens == rows.size
    assert m.splits["train"].documents + m.splits["valid"].documents == len(docs)


@pytest.mark.parametrize("overflow", ["split", "truncate"])
def test_pad_mode_rows_and_lengths(tmp_path, corpus_file, docs, overflow):
    out = tmp_path / "pad"
    m = prepare(corpus_file, out, tokenizer="char", seq_len=48, mode="pad", pad_overflow=overflow)
    tok = load_tokenizer_dir(out / "tokenizer")
    texts = [docs[i] for i in split_indices(len(docs), 0.05, None, seed=0)["train"]]
    rows, lengths = _rows(out, m, "train"), np.load(out / "train.lengths.npy")
    expected = []
    for text in texts:
        doc = [tok.bos_id, *tok.encode(text), tok.eos_id]
        chunks = [doc[i : i + 48] for i in range(0, len(doc), 48)]
        expected.extend(chunks[:1] if overflow == "truncate" else chunks)
    assert lengths.tolist() == [len(c) for c in expected]
    for row, n, chunk in zip(rows, lengths, expected, strict=True):
        assert row[:n].tolist() == chunk and (row[n:] == tok.pad_id).all()
    assert m.splits["train"].tokens == lengths.sum() and m.splits["train"].rows == len(rows)
    if overflow == "truncate":
        assert len(rows) == len(texts) and (rows[:, 0] == tok.bos_id).all()


def test_deterministic_bytes_and_checksums(tmp_path, corpus_file):
    a = prepare(corpus_file, tmp_path / "a", tokenizer="bpe", tokenizer_vocab_size=300, seq_len=32)
    b = prepare(corpus_file, tmp_path / "b", tokenizer="bpe", tokenizer_vocab_size=300, seq_len=32)
    for split in ("train", "valid"):
        fa, fb = tmp_path / "a" / f"{split}.bin", tmp_path / "b" / f"{split}.bin"
        assert fa.read_bytes() == fb.read_bytes()
        assert a.splits[split].sha256 == sha256_file(fa) == b.splits[split].sha256
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    assert load_manifest(tmp_path / "a") == verify(tmp_path / "a") == a


def test_manifest_contents(tmp_path, corpus_file, shared_data):
    gpt2 = load_tokenizer("gpt2", shared_data / "tokenizers" / "gpt2")
    m = prepare([corpus_file], tmp_path / "g", tokenizer=gpt2, seq_len=128, valid_docs=5)
    data = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert data["tokenizer"]["kind"] == "gpt2" and data["vocab_size"] == 50260
    assert (data["mask_id"], data["pad_id"], data["bos_id"], data["eos_id"]) == (
        50259, 50258, 50257, 50256
    )  # fmt: skip
    assert data["dtype"] == "uint16" and data["mode"] == "wrap" and data["seq_len"] == 128
    assert data["sources"] == [str(corpus_file)] and data["library_version"]
    assert data["splits"]["valid"]["documents"] == 5 == m.splits["valid"].documents
    assert load_tokenizer_dir(tmp_path / "g" / "tokenizer").special_ids == gpt2.special_ids


def test_uint32_for_large_vocab(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(66000))
    tok = load_tokenizer("char", corpus_texts=[text])
    assert tok.vocab_size > 65535
    (tmp_path / "big.txt").write_text(text[:40000] + "\n\n" + text[40000:])
    m = prepare(tmp_path / "big.txt", tmp_path / "out", tokenizer=tok, seq_len=1000, valid_docs=1)
    assert m.dtype == "uint32"
    rows = _rows(tmp_path / "out", m, "train")
    assert rows.max() >= 65536 and rows.max() < tok.vocab_size


def test_verify_detects_corruption(tmp_path, corpus_file):
    out = tmp_path / "d"
    prepare(corpus_file, out, tokenizer="char", seq_len=32)
    data = bytearray((out / "valid.bin").read_bytes())
    data[5] ^= 1  # the high byte of id 2: out of range, named before the checksum
    (out / "valid.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="row 0 holds id"):
        verify(out)
    data[5] ^= 1
    data[0:4] = data[2:4] + data[0:2]  # BOS and the first character swapped: valid ids
    (out / "valid.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        verify(out)
    (out / "valid.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match="truncated"):
        verify(out)


def test_existing_output_and_atomicity(tmp_path, corpus_file):
    out = tmp_path / "d"
    prepare(corpus_file, out, tokenizer="char", seq_len=32)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare(corpus_file, out, tokenizer="char", seq_len=32)
    with pytest.raises(ValueError, match="0 rows"):
        prepare(corpus_file, out, tokenizer="char", seq_len=10**6, overwrite=True)
    assert load_manifest(out).seq_len == 32  # the failed run left the old dataset intact
    prepare(corpus_file, out, tokenizer="char", seq_len=16, overwrite=True)
    assert load_manifest(out).seq_len == 16
    assert sorted(os.listdir(tmp_path)) == [".d.lock", "corpus.txt", "d"]  # no temporary files


def test_bad_inputs_raise_helpful_errors(tmp_path, corpus_file):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="nope.txt.*hf:NAME"):
        prepare(tmp_path / "nope.txt", out, tokenizer="char")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(ValueError, match="empty corpus.*blank.txt"):
        prepare(tmp_path / "blank.txt", out, tokenizer="char")
    with pytest.raises(ValueError, match="split 'valid' yields 0 rows of seq_len=4096.*lower"):
        prepare(corpus_file, out, tokenizer="char", seq_len=4096, valid_docs=1)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordz'"):
        prepare(corpus_file, out, tokenizer="wordz", seq_len=32)
    with pytest.raises(ValueError, match="unknown mode 'packed'"):
        prepare(corpus_file, out, tokenizer="char", mode="packed")
    with pytest.raises(ValueError, match="seq_len must be"):
        prepare(corpus_file, out, tokenizer="char", seq_len=1)
    (tmp_path / "one.txt").write_text("a single document\n")
    with pytest.raises(ValueError, match="1 documents, too few"):
        prepare(tmp_path / "one.txt", out, tokenizer="char", seq_len=4)
    (tmp_path / "x.csv").write_text("text\nabc\n")
    with pytest.raises(ValueError, match="unsupported input.*x.csv"):
        prepare(tmp_path / "x.csv", out, tokenizer="char")
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_manifest(tmp_path)
    assert not out.exists()
