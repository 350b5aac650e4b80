"""Streaming `prepare`: lazy reading, worker processes, resumable checkpoints."""

import gzip
import importlib
import json
import multiprocessing
import os
import random

import numpy as np
import pytest

import xdlm.data.encoding as encoding
from xdlm.data import embedded_corpus_path, load_tokenizer, prepare, read_documents
from xdlm.data.documents import Piece, iter_documents, split_documents
from xdlm.data.encoding import encode_stream, encode_texts

prepare_module = importlib.import_module("xdlm.data.prepare")  # the package re-exports prepare()


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return read_documents(embedded_corpus_path())[:300]


@pytest.fixture
def corpus_file(tmp_path, docs):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("gz", [False, True])
def test_lazy_text_reader_matches_the_document_rule(tmp_path, gz):
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "\n", "\n", "\r", "\r\n", "\v", "\f", "\xa0", "\x1c"]
    for case in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        path = tmp_path / f"c{case}.txt{'.gz' if gz else ''}"
        data = text.encode("utf-8")
        path.write_bytes(gzip.compress(data) if gz else data)
        assert list(iter_documents(path)) == split_documents(text), repr(text)


def test_encode_texts_frames_documents(docs):
    tok = load_tokenizer("char", corpus_texts=iter(docs))  # an iterator is enough to train
    batch = encode_texts(tok, docs[:7])
    assert len(batch) == 7 and batch.n_bytes == sum(len(d.encode()) for d in docs[:7])
    for j, text in enumerate(docs[:7]):
        doc = batch.ids[batch.offsets[j] : batch.offsets[j + 1]].tolist()
        assert doc == [tok.bos_id, *tok.encode(text), tok.eos_id]


def test_pieces_are_framed_by_their_flags_into_int64_ids(docs):
    tok = load_tokenizer("char", corpus_texts=docs)
    pieces = [Piece("ab", True, False), Piece("cd", False, True), "ef"]
    batch = encode_texts(tok, pieces)
    a, b, c, d, e, f = (tok.encode(x)[0] for x in "abcdef")
    assert batch.ids.tolist() == [tok.bos_id, a, b, c, d, tok.eos_id, tok.bos_id, e, f, tok.eos_id]
    assert batch.offsets.tolist() == [0, 3, 6, 10] and batch.n_bytes == 6
    assert batch.first.tolist() == [True, False, True]
    assert batch.last.tolist() == [False, True, True]
    dtypes = [x.dtype for x in (batch.ids, batch.offsets, batch.first, batch.last)]
    assert dtypes == [np.int64, np.int64, bool, bool]


def test_at_most_two_batches_per_worker_are_in_flight(tmp_path, docs):
    """Memory holds 2 * num_proc batches: the first result is handed out once that many are
    submitted, whatever the workers' speed. 3 workers: one more than this machine's cores, so a
    pool left at its default size (`os.cpu_count()`) is seen."""
    tok = load_tokenizer("char", corpus_texts=docs)
    tok.save(tmp_path / "tok")
    drawn = []

    def batches():
        for i in range(10):
            drawn.append(i)
            yield docs[i : i + 1]

    stream = encode_stream(batches(), tok, tmp_path / "tok", num_proc=3)
    assert len(next(stream)) == 1 and len(drawn) == 6
    assert len(multiprocessing.active_children()) == 3  # num_proc workers, whatever the cores
    assert len(list(stream)) == 9 and len(drawn) == 10
    with pytest.raises(ValueError, match=r"^num_proc must be >= 1, got 0$"):
        next(encode_stream(batches(), tok, tmp_path / "tok", num_proc=0))


def test_worker_processes_keep_order(tmp_path, docs):
    tok = load_tokenizer("char", corpus_texts=docs)
    tok.save(tmp_path / "tok")
    batches = [docs[i : i + 13] for i in range(0, len(docs), 13)]
    one = list(encode_stream(iter(batches), tok, tmp_path / "tok", num_proc=1))
    two = list(encode_stream(iter(batches), tok, tmp_path / "tok", num_proc=2))
    assert len(one) == len(two) == len(batches)
    for a, b in zip(one, two, strict=True):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)


@pytest.mark.parametrize("mode", ["wrap", "pad"])
def test_num_proc_gives_the_same_bytes(tmp_path, corpus_file, mode):
    kw = dict(tokenizer="bpe", tokenizer_vocab_size=300, seq_len=40, mode=mode, batch_bytes=4096)
    a = prepare(corpus_file, tmp_path / "one", num_proc=1, **kw)
    b = prepare(corpus_file, tmp_path / "two", num_proc=2, **kw)
    assert a == b and _files(tmp_path / "one") == _files(tmp_path / "two")


def _interrupt_after(monkeypatch, n_batches):
    """Make `prepare` die (as a kill would) after tokenizing `n_batches` batches."""
    real = prepare_module._batches

    def dying(texts, batch_bytes):
        for i, batch in enumerate(real(texts, batch_bytes)):
            if i == n_batches:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(prepare_module, "_batches", dying)


@pytest.mark.parametrize("mode", ["wrap", "pad"])
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, corpus_file, monkeypatch, mode):
    kw = dict(tokenizer="char", seq_len=48, mode=mode, batch_bytes=8192, checkpoint_seconds=0)
    reference = prepare(corpus_file, tmp_path / "ref", **kw)
    _interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus_file, tmp_path / "out", **kw)
    partial = tmp_path / ".out.partial"
    done = json.loads((partial / "progress.json").read_text())["pieces_done"]
    assert 0 < done < 300 and not (tmp_path / "out").exists()
    monkeypatch.undo()
    encoded = []
    real_encode = encoding.encode_texts
    monkeypatch.setattr(
        encoding,
        "encode_texts",
        lambda tok, texts: encoded.extend(texts) or real_encode(tok, texts),
    )
    resumed = prepare(corpus_file, tmp_path / "out", **kw)
    assert len(encoded) == 300 - done  # only the documents after the checkpoint
    assert resumed == reference
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    assert sorted(os.listdir(tmp_path)) == [".out.lock", ".ref.lock", "corpus.txt", "out", "ref"]
    assert (tmp_path / ".out.lock").read_text() == ""  # released (the empty file stays)


def test_resume_refuses_other_arguments_and_restarts_on_request(tmp_path, corpus_file, monkeypatch):
    kw = dict(tokenizer="char", seq_len=48, batch_bytes=8192, checkpoint_seconds=0)
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus_file, tmp_path / "out", **kw)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unfinished preparation.*resume=False"):
        prepare(corpus_file, tmp_path / "out", **{**kw, "seq_len": 32})
    assert (tmp_path / ".out.partial" / "progress.json").is_file()  # kept for a later resume
    m = prepare(corpus_file, tmp_path / "out", **{**kw, "seq_len": 32}, resume=False)
    assert m.seq_len == 32 and not (tmp_path / ".out.partial").exists()


def test_resume_detects_a_truncated_shard(tmp_path, corpus_file, monkeypatch):
    kw = dict(tokenizer="char", seq_len=48, batch_bytes=8192, checkpoint_seconds=0)
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus_file, tmp_path / "out", **kw)
    monkeypatch.undo()
    (tmp_path / ".out.partial" / "train.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot resume.*shorter than its checkpoint"):
        prepare(corpus_file, tmp_path / "out", **kw)


def test_bad_num_proc(tmp_path, corpus_file):
    with pytest.raises(ValueError, match="num_proc must be an int >= 1"):
        prepare(corpus_file, tmp_path / "out", tokenizer="char", num_proc=0)


def test_prepare_help_lists_every_tokenizer_kind(capsys):
    from xdlm.cli import main
    from xdlm.data.tokenizers import KINDS

    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert all(kind in out for kind in KINDS) and "--num-proc" in out and "--no-resume" in out
