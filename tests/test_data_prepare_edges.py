"""Edges of `prepare` (issue 29): each argument at its limit and one past, every refusal word
for word, how batches are cut, what a resume compares, the progress shown, the manifest."""

import errno
import importlib
import importlib.metadata
import io
import json
import os
import sys
import types

import pytest

import xdlm.data.encoding as encoding
from xdlm.data import load_tokenizer_dir, prepare

prepare_module = importlib.import_module("xdlm.data.prepare")
DOCS = [f"document {i} " + "abcdefgh"[: i % 8] for i in range(12)]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    return path


def _refused(message, corpus, out, **kwargs):
    with pytest.raises(ValueError) as info:
        prepare(corpus, out, **{"tokenizer": "char", **kwargs})
    assert str(info.value) == message
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 1}, "seq_len must be an int >= 2 (room for BOS and EOS), got 1"),
        ({"seq_len": 8.0}, "seq_len must be an int >= 2 (room for BOS and EOS), got 8.0"),
        ({"valid_fraction": 1.0}, "valid_fraction must be in [0, 1), got 1.0"),
        ({"valid_fraction": -0.1}, "valid_fraction must be in [0, 1), got -0.1"),
        ({"valid_docs": -1}, "valid_docs must be >= 0 or None, got -1"),
        ({"num_proc": 2.0}, "num_proc must be an int >= 1, got 2.0"),
        ({"mode": "packed"}, "unknown mode 'packed'; choose one of ('wrap', 'pad')"),
        ({"pad_overflow": "drop"},
         "unknown pad_overflow 'drop'; choose one of ('split', 'truncate')"),
    ],
)  # fmt: skip
def test_each_argument_one_past_its_limit_is_refused(corpus, tmp_path, kwargs, message):
    _refused(message, corpus, tmp_path / "out", **kwargs)


def test_each_argument_exactly_at_its_limit_is_accepted(corpus, tmp_path):
    m = prepare(corpus, tmp_path / "a", tokenizer="char", seq_len=2, valid_docs=0)
    assert m.seq_len == 2 and list(m.splits) == ["train"] and m.splits["train"].documents == 12
    m = prepare([str(corpus)], tmp_path / "b", tokenizer="char", seq_len=4, valid_fraction=0.0)
    assert list(m.splits) == ["train"] and m.sources == [str(corpus)]
    m = prepare(corpus, tmp_path / "c", tokenizer="char", seq_len=4, valid_fraction=0.95)
    assert (m.splits["train"].documents, m.splits["valid"].documents) == (1, 11)
    _refused("no inputs given; pass text files or 'hf:NAME' dataset names", [], tmp_path / "d")


def test_a_batch_closes_once_it_holds_batch_bytes_characters(corpus, tmp_path, monkeypatch):
    sizes = []
    real = encoding.encode_texts
    spy = lambda tok, texts: sizes.append(len(texts)) or real(tok, texts)  # noqa: E731
    monkeypatch.setattr(encoding, "encode_texts", spy)
    same = [f"doc{i:02d} xy" for i in range(6)]  # 8 characters each
    (tmp_path / "same.txt").write_text("\n\n".join(same))
    prepare(tmp_path / "same.txt", tmp_path / "a", tokenizer="char", seq_len=4, batch_bytes=16)
    assert sizes == [2, 2, 2]  # 16 characters reached exactly: the batch closes
    sizes.clear()
    prepare(tmp_path / "same.txt", tmp_path / "b", tokenizer="char", seq_len=4, batch_bytes=17)
    assert sizes == [3, 3]


def test_a_changed_input_is_not_resumed(corpus, tmp_path, monkeypatch):
    real = prepare_module._batches

    def dying(items, batch_bytes):
        yield next(real(items, batch_bytes))
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_batches", dying)
    kw = dict(tokenizer="char", seq_len=4, batch_bytes=16, checkpoint_seconds=0)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tmp_path / "out", **kw)
    monkeypatch.undo()
    plan = json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["plan"]
    stat = corpus.stat()
    assert plan["sources"] == [[str(corpus), stat.st_size, stat.st_mtime_ns]]
    corpus.write_text(corpus.read_text() + "\n\none more\n")
    with pytest.raises(
        ValueError,
        match=r"\.out\.partial holds an unfinished preparation with "
        r"other arguments or changed inputs; pass resume=False",
    ):
        prepare(corpus, tmp_path / "out", **kw)


def test_progress_is_shown_only_when_asked(corpus, tmp_path, capsys):
    prepare(corpus, tmp_path / "a", tokenizer="char", seq_len=4, progress=True)
    err = capsys.readouterr().err
    assert "counting documents: " in err and "tokenizing: " in err and "12/12" in err
    assert "doc/s" in err and "MBps=" in err and "tokens=" in err
    prepare(corpus, tmp_path / "b", tokenizer="char", seq_len=4, progress=False)
    assert capsys.readouterr().err == ""


def test_the_manifest_names_the_tokenizer_and_the_library(corpus, tmp_path, monkeypatch):
    m = prepare(corpus, tmp_path / "a", tokenizer="char", seq_len=4, seed=5)
    tok = load_tokenizer_dir(tmp_path / "a" / "tokenizer")
    assert m.tokenizer_sha256 == tok.fingerprint() and m.tokenizer == tok.spec
    assert (m.vocab_size, m.mask_id, m.pad_id, m.bos_id, m.eos_id) == (
        tok.vocab_size, tok.mask_id, tok.pad_id, tok.bos_id, tok.eos_id
    )  # fmt: skip
    assert m.seed == 5 and m.library_version == importlib.metadata.version("xdlm")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert prepare(corpus, tmp_path / "b", tokenizer="char", seq_len=4).library_version == "unknown"


def test_the_long_document_warning_points_at_the_caller(tmp_path):
    (tmp_path / "c.txt").write_text(("word " * 50_000).strip() + "\n\nshort one\n")
    with pytest.warns(UserWarning) as record:
        prepare(tmp_path / "c.txt", tmp_path / "o", tokenizer="char", seq_len=8, valid_fraction=0)
    assert len(record) == 1
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampolines add frames of their own
        assert record[0].filename == __file__
    assert record[0].filename != prepare_module.__file__
    assert str(record[0].message) == (
        "1 documents over 200,000 characters were read and tokenized in pieces cut before "
        "whitespace; split such inputs into documents (blank lines in .txt, one object per line "
        "in .jsonl) if that is not wanted"
    )


def _interrupted(corpus, out, monkeypatch, **kw):
    """Leave `out`'s work directory as a kill after the first batch would."""
    real = prepare_module._batches

    def dying(items, batch_bytes):
        yield next(real(items, batch_bytes))
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, out, **kw)
    monkeypatch.undo()


RESUME = dict(tokenizer="char", seq_len=4, batch_bytes=16, checkpoint_seconds=0)


@pytest.mark.parametrize(
    "base, change",
    [({}, {"seq_len": 5}), ({}, {"mode": "pad"}), ({"mode": "pad"}, {"pad_overflow": "truncate"}),
     ({}, {"valid_fraction": 0.2}), ({}, {"valid_docs": 2}), ({}, {"seed": 1}),
     ({}, {"tokenizer": "bpe", "tokenizer_vocab_size": 300}), ({}, {"text_field": "body"}),
     ({}, {"tokenizer_source": "x"}), ({"tokenizer_source": "x"}, {"tokenizer_source": "y"}),
     ({"tokenizer": "bpe", "tokenizer_vocab_size": 300}, {"tokenizer_vocab_size": 301})],
)  # fmt: skip
def test_a_resume_with_any_other_argument_is_refused(corpus, tmp_path, monkeypatch, base, change):
    _interrupted(corpus, tmp_path / "out", monkeypatch, **{**RESUME, **base})
    with pytest.raises(ValueError, match="holds an unfinished preparation with other arguments"):
        prepare(corpus, tmp_path / "out", **{**RESUME, **base, **change})
    assert (tmp_path / ".out.partial" / "progress.json").is_file()


def test_the_same_arguments_resume_without_tokenizing_again(corpus, tmp_path, monkeypatch):
    reference = prepare(corpus, tmp_path / "ref", **RESUME)
    _interrupted(corpus, tmp_path / "out", monkeypatch, **RESUME)
    trained = []
    monkeypatch.setattr(prepare_module, "load_tokenizer", lambda *a: trained.append(a))
    assert prepare(corpus, tmp_path / "out", **RESUME) == reference
    assert trained == []  # the saved tokenizer of the first run is used


def test_progress_none_is_silent_off_a_terminal_and_an_empty_corpus_is_named(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("a b\n\nc d\n")
    prepare(tmp_path / "c.txt", tmp_path / "o", tokenizer="char", seq_len=2, progress=None)
    assert capsys.readouterr().err == ""
    (tmp_path / "blank.txt").write_text(" \n\n\t\n")
    _refused(f"empty corpus: no non-blank document in ['{tmp_path / 'blank.txt'}']; check the "
             "files (or text_field) hold text", tmp_path / "blank.txt", tmp_path / "e")  # fmt: skip


def test_a_hub_dataset_is_a_source_of_its_own(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": d} for d in DOCS]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(rows))
    m = prepare("hf:org/name", tmp_path / "o", tokenizer="char", seq_len=4)
    assert m.sources == ["hf:org/name"] and sum(s.documents for s in m.splits.values()) == 12
    _interrupted("hf:org/name", tmp_path / "out", monkeypatch, **RESUME)
    plan = json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["plan"]
    assert plan["sources"] == [["hf:org/name", None, None]]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(rows))
    with pytest.raises(ValueError, match="holds an unfinished preparation with other arguments"):
        prepare("hf:org/other", tmp_path / "out", **RESUME)


def test_a_resume_with_another_tokenizer_object_is_refused(corpus, tmp_path, monkeypatch):
    from xdlm.data import load_tokenizer

    first = load_tokenizer("char", corpus_texts=DOCS)
    _interrupted(corpus, tmp_path / "out", monkeypatch, **{**RESUME, "tokenizer": first})
    other = load_tokenizer("char", corpus_texts=DOCS + ["xyz"])
    with pytest.raises(ValueError, match="holds an unfinished preparation with other arguments"):
        prepare(corpus, tmp_path / "out", **{**RESUME, "tokenizer": other})


def test_a_split_too_short_for_one_row_is_named(corpus, tmp_path):
    _refused("split 'valid' yields 0 rows of seq_len=64: its 1 documents are too short to fill "
             "one row; lower seq_len, raise valid_fraction/valid_docs, or add data", corpus,
             tmp_path / "o", seq_len=64, valid_docs=1)  # fmt: skip


def _plan(corpus, **kw) -> dict:
    """The plan progress.json records for `prepare(corpus, ...)` with `kw` (the rest defaults)."""
    stat = corpus.stat()
    return {
        "sources": [[str(corpus), stat.st_size, stat.st_mtime_ns]], "text_field": "text",
        "seq_len": 1024, "mode": "wrap", "pad_overflow": "split", "valid_fraction": 0.05,
        "valid_docs": None, "seed": 0, "tokenizer": "gpt2", "tokenizer_source": None,
        "tokenizer_vocab_size": None, "max_piece_chars": 200_000, **kw,
    }  # fmt: skip


@pytest.mark.parametrize(
    "kw",
    [{}, {"mode": "pad", "pad_overflow": "truncate", "valid_docs": 2, "seed": 3, "tokenizer": "bpe",
          "tokenizer_source": "vocab", "tokenizer_vocab_size": 300, "text_field": "body"}],
)  # fmt: skip
def test_the_progress_file_records_the_plan_a_resume_must_match(corpus, tmp_path, monkeypatch, kw):
    """progress.json is an on-disk format: a resumed run (of this or a later version) reads it."""
    _interrupted(corpus, tmp_path / "out", monkeypatch, **{**RESUME, **kw})
    state = json.loads((tmp_path / ".out.partial" / "progress.json").read_text())
    assert state["plan"] == _plan(corpus, **{"tokenizer": "char", "seq_len": 4, **kw})
    assert state["n_docs"] == 12 and state["tokenizer_saved"] is True


def test_the_plan_of_a_tokenizer_object_is_its_spec_and_special_ids(corpus, tmp_path, monkeypatch):
    from xdlm.data import load_tokenizer

    tok = load_tokenizer("char", corpus_texts=DOCS)
    _interrupted(corpus, tmp_path / "out", monkeypatch, **{**RESUME, "tokenizer": tok})
    plan = json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["plan"]
    assert plan["tokenizer"] == {**tok.spec, "special_ids": tok.special_ids}


def test_the_defaults_are_gpt2_rows_of_1024_wrapped_and_5_percent_valid(corpus, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    asked = []

    def stop(*args):
        asked.append(args)
        raise KeyboardInterrupt  # the plan is saved by now; gpt2 needs the hub

    monkeypatch.setattr(prepare_module, "load_tokenizer", stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tmp_path / "out")
    assert asked == [("gpt2", None, None, None)]
    state = json.loads((tmp_path / ".out.partial" / "progress.json").read_text())
    assert state["plan"] == _plan(corpus)


def test_a_jsonl_corpus_is_read_from_its_text_field(corpus, tmp_path):
    rows = [{"body": d, "text": "not this"} for d in DOCS]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(tokenizer="char", seq_len=4, valid_docs=3)
    prepare(tmp_path / "c.jsonl", tmp_path / "j", text_field="body", **kw)
    prepare(corpus, tmp_path / "t", **kw)
    for name in ("train.bin", "valid.bin"):
        assert (tmp_path / "j" / name).read_bytes() == (tmp_path / "t" / name).read_bytes()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _bars(text: str) -> dict[str, list[str]]:
    """Each bar's renders in order (tqdm redraws a line after a carriage return)."""
    bars = {"counting documents": [], "tokenizing": []}
    for line in text.replace("\r", "\n").split("\n"):
        for desc, renders in bars.items():
            if line.startswith(f"{desc}: "):
                renders.append(line)
    return bars


def test_progress_none_shows_the_bars_on_a_terminal_counting_from_zero(corpus, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    monkeypatch.setattr(sys, "stderr", _Terminal())
    prepare(corpus, tmp_path / "o", tokenizer="char", seq_len=4, progress=None)
    bars = _bars(sys.stderr.getvalue())
    counted, tokenized = bars["counting documents"], bars["tokenizing"]
    assert counted[0].startswith("counting documents: 0doc [")
    assert counted[-1].startswith("counting documents: 12doc [")
    assert tokenized[0].startswith("tokenizing:   0%|") and " 0/12 [" in tokenized[0]
    assert tokenized[-1].startswith("tokenizing: 100%|") and " 12/12 [" in tokenized[-1]


def test_a_resume_counts_no_documents_and_its_bar_starts_at_the_documents_done(
    corpus, tmp_path, monkeypatch
):
    _interrupted(corpus, tmp_path / "out", monkeypatch, **RESUME)
    done = json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["docs_done"]
    assert done == 2  # the first batch: 10 + 12 characters reach batch_bytes=16
    monkeypatch.setattr(sys, "stderr", _Terminal())
    prepare(corpus, tmp_path / "out", **RESUME, progress=True)
    bars = _bars(sys.stderr.getvalue())
    assert bars["counting documents"] == []  # the count was saved with the plan
    assert f" {done}/12 [" in bars["tokenizing"][0]
    assert " 12/12 [" in bars["tokenizing"][-1]


SEVEN = [f"doc{i:02d} xy" for i in range(7)]  # 8 characters: one document per batch of 8


@pytest.mark.parametrize(
    "step, checkpoints, rate",
    [(60.0, [2, 4, 6, 7], "0.00"), (60.5, [1, 2, 3, 4, 5, 6, 7, 7], "0.00"), (1e-6, [7], "8.00")],
)
def test_a_checkpoint_follows_each_batch_that_ends_over_60_seconds_after_the_last(
    tmp_path, monkeypatch, step, checkpoints, rate
):
    """prepare's clock advances `step` seconds per batch; checkpoints come once more than
    checkpoint_seconds (60 by default) have passed, and at the end (7 batches done); the bar
    shows bytes / 1e6 / elapsed."""
    (tmp_path / "c.txt").write_text("\n\n".join(SEVEN))
    encoded, saved = [], []
    real_encode, real_checkpoint = encoding.encode_texts, prepare_module._Job._checkpoint
    spy = lambda tok, texts: encoded.append(len(texts)) or real_encode(tok, texts)  # noqa: E731
    monkeypatch.setattr(encoding, "encode_texts", spy)
    clock = types.SimpleNamespace(monotonic=lambda: 1000.0 + step * len(encoded))
    monkeypatch.setattr(prepare_module, "time", clock)

    def checkpoint(job, writers, done, docs_done):
        saved.append((done, docs_done))
        real_checkpoint(job, writers, done, docs_done)

    monkeypatch.setattr(prepare_module._Job, "_checkpoint", checkpoint)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    m = prepare(tmp_path / "c.txt", tmp_path / "o", tokenizer="char", seq_len=4, valid_docs=0,
                batch_bytes=8, progress=True)  # fmt: skip
    assert encoded == [1] * 7  # in this process: num_proc defaults to 1
    assert m.splits["train"].documents == 7  # counted over every batch
    assert saved == [(n, n) for n in checkpoints]  # pieces and documents done: one piece each
    final = _bars(sys.stderr.getvalue())["tokenizing"][-1].rstrip()  # tqdm pads to overwrite
    assert final.endswith(f", MBps={rate}, tokens={m.splits['train'].tokens:.3g}]")


def test_the_cli_builds_a_tokenizer_kind_from_its_source(corpus, tmp_path, shared_data, capsys):
    from xdlm.cli import main

    source = shared_data / "tokenizers" / "gpt2"
    out = tmp_path / "o"
    assert main(["prepare", str(corpus), "--out", str(out), "--tokenizer", "gpt2",
                 "--tokenizer-source", str(source), "--seq-len", "8", "--valid-docs", "0",
                 "--num-proc", "1", "--no-progress"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"kind": "gpt2", "source": str(source), "vocab_size": 50260}
    assert manifest["splits"]["train"]["documents"] == 12
    assert capsys.readouterr().out.endswith(f"bos=50257 eos=50256 -> {out}\n")


def test_a_full_disk_in_any_form_is_one_enospc_error_keeping_the_checkpoint(
    corpus, tmp_path, monkeypatch
):
    from xdlm.data import TextTokenizer

    def full(tok, directory):
        raise Exception("No space left on device (os error 28)")  # the tokenizers library's form

    monkeypatch.setattr(TextTokenizer, "save", full)
    with pytest.raises(OSError) as info:
        prepare(corpus, tmp_path / "o", tokenizer="char", seq_len=4)
    assert info.value.errno == errno.ENOSPC
    assert info.value.strerror == (
        f"preparing {tmp_path / 'o'} failed: no space left on device (Exception: No space left on "
        f"device (os error 28)) while writing {tmp_path / '.o.partial'}; free disk space and run "
        "the same command again: it continues from its last checkpoint (--no-resume starts over)"
    )
    assert (tmp_path / ".o.partial" / "progress.json").is_file()
