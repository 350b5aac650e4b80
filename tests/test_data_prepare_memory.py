"""Documents of any length (issue 28.4): `.txt` sources are read and tokenized in pieces
(`xdlm.data.documents.iter_pieces`) and written piece by piece, so peak memory does not grow
with a document. Before, a 20 MB line peaked at 1.05 GB and a 200 MB one at 6.58 GB."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from xdlm.data import load_tokenizer, prepare
from xdlm.data.documents import document_pieces, iter_pieces, split_documents
from xdlm.data.encoding import encode_texts


@pytest.mark.parametrize("max_chars", [1, 2, 3, 7, 1000])
def test_pieces_follow_the_document_rule_at_any_piece_size(tmp_path, max_chars):
    """Joined, a document's pieces are `split_documents`' document; no piece is longer than
    `max_chars`; reading from a file cuts where cutting the document in memory does (runs of
    whitespace longer than a piece go through `_Held`'s temporary file)."""
    rng = random.Random(max_chars)
    alphabet = ["a", "b", " ", "\t", "\n", "\n", "\r", "\r\n", "\v", "\f", "\xa0", "\x1c"]
    for case in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        path = tmp_path / f"c{case}.txt"
        path.write_bytes(text.encode("utf-8"))
        pieces = list(iter_pieces(path, max_chars=max_chars))
        docs, parts = [], []
        for piece in pieces:
            assert len(piece.text) <= max_chars and piece.first == (not parts)
            parts.append(piece.text)
            if piece.last:
                docs, parts = [*docs, "".join(parts)], []
        assert docs == split_documents(text), repr(text)
        assert pieces == [p for d in docs for p in document_pieces(d, max_chars)], repr(text)


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_pieces_give_the_ids_of_the_whole_document(tiny_corpus, tokenizer):
    text = " ".join(tiny_corpus.read_text().split())[:20_000]  # one line, one document
    tok = load_tokenizer(tokenizer, corpus_texts=[text], vocab_size=300)
    whole = encode_texts(tok, ["short doc", text, "end"])
    pieces = list(document_pieces(text, max_chars=1000))
    pieced = encode_texts(tok, ["short doc", *pieces, "end"])
    assert len(pieces) > 20 and np.array_equal(pieced.ids, whole.ids)
    assert pieced.n_bytes == whole.n_bytes


@pytest.mark.parametrize(
    "mode, overflow", [("wrap", "split"), ("pad", "split"), ("pad", "truncate")]
)
def test_a_document_over_the_piece_size_is_written_as_if_whole(
    tmp_path, tiny_corpus, mode, overflow
):
    """A 450,000-character line (3 pieces, each batch one piece): the rows (and lengths) are
    those of the whole document, with a warning that it was cut."""
    words = " ".join(tiny_corpus.read_text().split())
    long = (words * (450_000 // len(words) + 1))[:450_000].strip()
    (tmp_path / "c.txt").write_text(f"{long}\n\nA short one.\n")
    kw = dict(tokenizer="char", seq_len=64, mode=mode, pad_overflow=overflow, valid_fraction=0.0)
    with pytest.warns(UserWarning, match="1 documents over 200,000 characters were read and"):
        m = prepare(tmp_path / "c.txt", tmp_path / "out", batch_bytes=1 << 16, **kw)
    tok = load_tokenizer("char", corpus_texts=[long, "A short one."])
    docs = [[tok.bos_id, *tok.encode(d), tok.eos_id] for d in (long, "A short one.")]
    L, rows, lengths = 64, [], []
    if mode == "wrap":
        stream = np.concatenate(docs)
        rows = stream[: len(stream) // L * L].reshape(-1, L)
    else:
        chunks = [d[i : i + L] for d in docs for i in range(0, len(d), L)]
        chunks = [d[:L] for d in docs] if overflow == "truncate" else chunks
        rows = np.full((len(chunks), L), tok.pad_id)
        for r, c in enumerate(chunks):
            rows[r, : len(c)], lengths = c, [*lengths, len(c)]
    got = np.fromfile(tmp_path / "out" / "train.bin", dtype=m.dtype).reshape(-1, L)
    assert np.array_equal(got, rows)
    if mode == "pad":
        assert np.load(tmp_path / "out" / "train.lengths.npy").tolist() == lengths
    assert m.splits["train"].documents == 2


# Runs `prepare` on each file in a fresh child and reports the children's peak RSS after each
# (RUSAGE_CHILDREN: the largest child so far).
_MEASURE = """
import json, resource, subprocess, sys
peaks = []
for path in sys.argv[1:]:
    code = ("import sys; from xdlm.data.prepare import prepare; prepare([sys.argv[1]], "
            "sys.argv[2], tokenizer='char', seq_len=64, valid_fraction=0.0, progress=False, "
            "batch_bytes=1 << 16)")
    subprocess.run([sys.executable, "-c", code, path, path + ".out"], check=True)
    peaks.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
print(json.dumps(peaks))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_a_document(tmp_path):
    """A 1 MB line, a 3 MB line, and 3 MB of whitespace inside one document: every peak is
    within 25 MB of the first (the old reader and encoder: +76 MB for 1 -> 4 MB)."""
    rng, words = random.Random(0), ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    files = []
    for name, body in [
        ("line1mb", " ".join(rng.choice(words) for _ in range(200_000))[:1_000_000]),
        ("line3mb", " ".join(rng.choice(words) for _ in range(600_000))[:3_000_000]),
        ("spaces3mb", "start" + " \t" * 1_500_000 + "end"),
    ]:
        files.append(tmp_path / f"{name}.txt")
        files[-1].write_text(body + "\n\nand a second, short document.\n")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MEASURE), *map(str, files)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.splitlines()[-1])
    assert max(peaks) - peaks[0] < 25, peaks
