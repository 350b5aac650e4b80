"""Edges of the small data modules (issue 29): the train/valid split at its limits, the embedded
corpus' refusals, byte-level UTF-8 decoding at every sequence length, the tokenizer worker's
start (it runs in forked processes, where mutmut sees no coverage, so it is also called here)."""

import ctypes
import dataclasses
import json
import os
import re
import signal
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import xdlm.data.encoding as encoding
from xdlm.data import embedded_corpus_path, load_tokenizer
from xdlm.data.bytelevel import utf8_text
from xdlm.data.encoding import EncodedBatch
from xdlm.data.shard_writer import SplitFormat, SplitWriter
from xdlm.data.splits import split_indices, valid_mask


def test_a_positive_valid_fraction_holds_out_at_least_one_document():
    parts = split_indices(100, 0.004, None, seed=0)  # round(0.4) = 0 -> one document
    assert len(parts["valid"]) == 1 and len(parts["train"]) == 99
    assert len(split_indices(100, 0.015, None, seed=0)["valid"]) == 2  # round(1.5) = 2
    assert "valid" not in split_indices(100, 0.5, 0, seed=0)  # an explicit 0 is kept


def test_the_split_keeps_at_least_one_training_document():
    parts = split_indices(5, 0.0, 4, seed=0)  # exactly at the limit: one training document
    assert len(parts["train"]) == 1 and len(parts["valid"]) == 4
    message = (
        "the corpus has 5 documents, too few to hold out 5 for validation and keep some for "
        "training; add documents or lower valid_fraction/valid_docs"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        split_indices(5, 0.0, 5, seed=0)
    with pytest.raises(ValueError, match="has 1 documents, too few to hold out 1"):
        split_indices(1, 0.01, None, seed=0)  # the one held-out document would be all


def test_valid_mask_marks_exactly_the_valid_documents():
    parts = split_indices(20, 0.25, None, seed=7)
    mask = valid_mask(20, 0.25, None, seed=7)
    assert mask.dtype == bool and mask.shape == (20,)
    assert np.array_equal(np.flatnonzero(mask), parts["valid"])
    assert not valid_mask(20, 0.0, None, seed=7).any()


def test_the_embedded_corpus_names_its_choices_and_a_missing_file(monkeypatch):
    assert embedded_corpus_path("austen").name == "austen.txt.gz"
    assert embedded_corpus_path().is_file()
    unknown = r"^unknown embedded corpus 'kjv'; choose one of \('austen',\)$"
    with pytest.raises(ValueError, match=unknown):
        embedded_corpus_path("kjv")
    monkeypatch.setattr("xdlm.data.corpora.EMBEDDED", ("austen", "lost"))
    missing = r"lost\.txt\.gz is missing from this install; reinstall xdlm \(package data data/"
    with pytest.raises(FileNotFoundError, match=missing):
        embedded_corpus_path("lost")


TEXT = "a\u00e9\u4e2d\U0001f600b"  # characters of 1, 2, 3 and 4 UTF-8 bytes


def test_utf8_text_of_every_window_is_the_characters_inside_it():
    """A window [i, j) of valid UTF-8 decodes to exactly the characters whose bytes all lie
    inside it: a cut character at either end, of any length, is left out, nothing replaced."""
    data, spans, pos = TEXT.encode(), [], 0
    for char in TEXT:
        spans.append((pos, pos + len(char.encode()), char))
        pos += len(char.encode())
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            inside = "".join(c for start, end, c in spans if i <= start and end <= j)
            assert utf8_text(data[i:j]) == inside, (i, j)


@pytest.mark.parametrize(
    "data, text",
    [
        (b"a\xf8", "a\ufffd"),  # 5- and 8-byte "leads" do not exist: invalid, not cut
        (b"a\xff", "a\ufffd"),
        (b"\x80\x80\x80", ""),  # up to 3 leading continuation bytes: a cut character
        (b"\x80\x80\x80\x80", "\ufffd"),
        (b"a\x80\x80\x80\x80", "a\ufffd\ufffd\ufffd\ufffd"),  # no lead in the last 4: kept
        (b"\xf0\x9f\x98\x80\x80", "\U0001f600\ufffd"),
    ],
)
def test_utf8_text_replaces_what_no_cut_explains(data, text):
    assert utf8_text(data) == text


_PR_GET_PDEATHSIG = 2  # <linux/prctl.h>


def _death_signal() -> int:
    value = ctypes.c_int()
    ctypes.CDLL(None).prctl(_PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    return value.value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_tokenizer_worker_loads_the_saved_tokenizer_and_dies_with_its_parent(
    tmp_path, monkeypatch
):
    tok = load_tokenizer("char", corpus_texts=["ab c"])
    tok.save(tmp_path / "tok")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setattr(encoding, "_WORKER_TOKENIZER", None)
    with pytest.raises(AssertionError, match="^worker started without _init_worker$"):
        encoding._encode_in_worker(["ab"])
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    try:
        encoding._init_worker(str(tmp_path / "tok"), os.getppid())  # as a pool worker would
        assert _death_signal() == signal.SIGKILL and exits == []
        encoding._die_with_parent(os.getpid())  # a "parent" that is not ours: gone already
        assert exits == [1]
    finally:
        ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG 0: this process stays
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    batch = encoding._encode_in_worker(["ab", "c"])
    a, b, c = tok.encode("abc")
    assert batch.ids.tolist() == [tok.bos_id, a, b, tok.eos_id, tok.bos_id, c, tok.eos_id]


def _batch(*pieces: tuple[list[int], bool, bool]) -> EncodedBatch:
    """An EncodedBatch of (ids, first, last) pieces (BOS/EOS already in the ids)."""
    offsets = np.cumsum([0, *(len(ids) for ids, _, _ in pieces)])
    ids = np.asarray([i for p, _, _ in pieces for i in p], dtype=np.int64)
    first, last = (np.asarray([p[k] for p in pieces], dtype=bool) for k in (1, 2))
    return EncodedBatch(ids, offsets, first, last, n_bytes=0)


# A 10-id document in two pieces across two batches, a 3-id one, and one the split leaves out.
_LONG_HEAD = [1, 10, 11, 12, 13, 14, 15, 16, 17]
_BATCHES = [
    (_batch((_LONG_HEAD, True, False)), [True]),
    (_batch(([18, 2], False, True), ([1, 20, 2], True, True), ([1, 30, 2], True, True)),
     [True, True, False]),
]  # fmt: skip


def _write(tmp_path, mode, overflow, resume_after_first=False):
    fmt = SplitFormat(seq_len=4, mode=mode, dtype="uint16", pad_id=0, pad_overflow=overflow)
    writer = SplitWriter(tmp_path, "train", fmt, None)
    states = []
    for batch, keep in _BATCHES:
        writer.add(batch, np.asarray(keep))
        states.append(writer.checkpoint())
        if resume_after_first and len(states) == 1:
            writer.add(*_BATCHES[1][:1], np.ones(3, dtype=bool))  # written after the checkpoint
            writer.close()
            writer = SplitWriter(tmp_path, "train", fmt, states[0])
    info = writer.finish()
    rows = np.fromfile(tmp_path / "train.bin", dtype=np.uint16).reshape(-1, 4).tolist()
    lengths = np.load(tmp_path / info.lengths_file).tolist() if info.lengths_file else None
    return states, info, rows, lengths


@pytest.mark.parametrize("resume", [False, True])
def test_pad_split_writes_a_document_across_batches_as_if_whole(tmp_path, resume):
    states, info, rows, lengths = _write(tmp_path, "pad", "split", resume)
    assert rows == [[1, 10, 11, 12], [13, 14, 15, 16], [17, 18, 2, 0], [1, 20, 2, 0]]
    assert lengths == [4, 4, 3, 3] and not (tmp_path / "train.lengths.partial").exists()
    assert (states[0].rows, states[0].tokens, states[0].documents) == (2, 8, 0)
    assert (states[0].tail, states[0].doc_rows) == ([17], 2)  # the open document's 2 rows
    assert json.dumps(dataclasses.asdict(states[0])) == (  # progress.json holds integers
        '{"rows": 2, "tokens": 8, "documents": 0, "tail": [17], "doc_rows": 2}'
    )
    assert (states[1].rows, states[1].tokens, states[1].documents) == (4, 14, 2)
    assert (states[1].tail, states[1].doc_rows) == ([], 0)
    assert (info.rows, info.tokens, info.documents) == (4, 14, 2)


def test_pad_truncate_keeps_only_the_first_row_of_a_long_document(tmp_path):
    states, info, rows, lengths = _write(tmp_path, "pad", "truncate")
    assert rows == [[1, 10, 11, 12], [1, 20, 2, 0]] and lengths == [4, 3]
    assert (states[0].rows, states[0].tail, states[0].doc_rows) == (1, [], 1)
    assert (info.rows, info.tokens, info.documents) == (2, 7, 2)


@pytest.mark.parametrize("resume", [False, True])
def test_wrap_carries_the_tail_across_batches_and_drops_it_at_the_end(tmp_path, resume):
    states, info, rows, lengths = _write(tmp_path, "wrap", "split", resume)
    assert rows == [[1, 10, 11, 12], [13, 14, 15, 16], [17, 18, 2, 1]] and lengths is None
    assert (states[0].rows, states[0].tokens, states[0].tail) == (2, 8, [17])
    assert (states[1].tail, info.rows, info.tokens, info.documents) == ([20, 2], 3, 12, 2)


def test_a_writer_resumes_only_from_a_file_at_least_as_long_as_its_checkpoint(tmp_path):
    fmt = SplitFormat(seq_len=4, mode="pad", dtype="uint16", pad_id=0, pad_overflow="split")
    writer = SplitWriter(tmp_path, "train", fmt, None)
    writer.add(*_BATCHES[0][:1], np.ones(1, dtype=bool))
    state = writer.checkpoint()
    writer.close()
    (tmp_path / "train.lengths.partial").write_bytes(b"\0" * 15)  # 2 rows need 16 bytes
    with pytest.raises(
        ValueError,
        match=r"lengths\.partial is missing or shorter than its "
        r"checkpoint \(16 bytes\); prepare again with resume=False \(--no-resume\)$",
    ):
        SplitWriter(tmp_path, "train", fmt, state)
    (tmp_path / "train.lengths.partial").write_bytes(b"\0" * 16)  # exactly long enough
    SplitWriter(tmp_path, "train", fmt, state).close()
    (tmp_path / "train.bin").unlink()
    with pytest.raises(ValueError, match=r"train\.bin is missing or shorter"):
        SplitWriter(tmp_path, "train", fmt, state)


def _hf_dir(path, vocab, added=(), **special_tokens):
    """A transformers fast tokenizer (word level) saved with save_pretrained; with "<s>" and
    "</s>" in `vocab` its post-processor frames every text with them, as BERT's does."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    if "<s>" in vocab:
        ends = [(t, vocab.index(t)) for t in ("<s>", "</s>")]
        base.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                            special_tokens=ends)  # fmt: skip
    base.add_tokens([AddedToken(a, special=True) for a in added])
    PreTrainedTokenizerFast(tokenizer_object=base, **special_tokens).save_pretrained(path)
    return path


def test_hf_tokenizers_keep_their_distinct_specials_and_append_the_missing(tmp_path):
    pytest.importorskip("transformers")
    own = _hf_dir(
        tmp_path / "own",
        ["<unk>", "a", "<s>", "</s>", "<pad>", "<mask>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    tok = load_tokenizer("hf", own)  # fmt: skip
    assert tok.special_ids == {"bos": 2, "eos": 3, "pad": 4, "mask": 5} and tok.vocab_size == 6
    assert tok.spec == {"kind": "hf", "source": str(own), "vocab_size": 6}
    assert tok.encode("a a") == [1, 1] and tok.encode_batch(["a"]) == [[1]]  # no <s> ... </s>
    llada = _hf_dir(
        tmp_path / "llada",
        ["<unk>", "a", "<|endoftext|>"],
        added=["<|mdm_mask|>"],
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok = load_tokenizer("hf", llada)  # the added mask is found; BOS, PAD = EOS get their own
    assert tok.special_tokens == {"mask": "<|mdm_mask|>", "eos": "<|endoftext|>",
                                  "bos": "[BOS]", "pad": "[PAD]"}  # fmt: skip
    assert tok.special_ids == {"bos": 4, "eos": 2, "pad": 5, "mask": 3}
    bare = load_tokenizer("hf", _hf_dir(tmp_path / "bare", ["<unk>", "a", "[MASK]"]))
    assert bare.special_tokens == {"mask": "[MASK]", "eos": "[EOS]", "bos": "[BOS]",
                                   "pad": "[PAD]"}  # fmt: skip
    assert bare.special_ids == {"bos": 3, "eos": 4, "pad": 5, "mask": 2}  # appended in role order
    none = load_tokenizer("hf", _hf_dir(tmp_path / "none", ["<unk>", "a"]))  # no mask anywhere
    assert none.special_tokens["mask"] == "[MASK]" and none.mask_id == 5


def test_an_hf_tokenizer_that_cannot_serve_is_named(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")

    def load(source):
        if source.endswith("slow"):
            return SimpleNamespace(is_fast=False)
        if source.endswith("odd"):
            return SimpleNamespace()  # no is_fast at all: not a fast tokenizer either
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load)
    for name in ("slow", "odd"):
        with pytest.raises(ValueError) as info:
            load_tokenizer("hf", f"org/{name}")
        assert str(info.value) == (
            f"tokenizer 'org/{name}' has no fast (tokenizers) backend; convert it first"
        )
    with pytest.raises(ValueError) as info:
        load_tokenizer("hf", "org/x")
    assert str(info.value) == (
        "could not load tokenizer 'org/x' with AutoTokenizer (offline); pass a local directory "
        "saved with save_pretrained"
    )


def test_byte_level_decoding_skips_every_special_and_keeps_added_text(capfd):
    from tokenizers import AddedToken

    tok = load_tokenizer("bpe", corpus_texts=["abc abd"], vocab_size=261)
    assert capfd.readouterr() == ("", "")  # training shows no progress of its own
    assert tok.spec == {"kind": "bpe", "source": "corpus", "vocab_size": 261}
    chars = load_tokenizer("char", corpus_texts=["ba"]).spec
    assert chars == {"kind": "char", "source": "corpus", "vocab_size": 7}  # a, b, [UNK], 4
    tok._tok.add_tokens([AddedToken("\u00fc")])  # an added ordinary token: its text as is
    tok._tok.add_special_tokens([AddedToken("<extra>", special=True)])  # no role, still special
    text, extra = tok.encode("abc abd"), tok._tok.token_to_id("<extra>")
    plain = tok._tok.token_to_id("\u00fc")
    assert tok.decode([extra, *text, plain]) == "abc abd\u00fc"
    assert tok.decode([extra, *text], skip_special=False) == "<extra>abc abd"
