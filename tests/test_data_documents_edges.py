"""Edges of reading documents (issue 29): every refusal word for word, where pieces are cut,
the `hf:` source grammar, suffixes in any case."""

import gzip
import json
import locale
import sys
from pathlib import Path

import pytest

import xdlm.data.documents as documents
from xdlm.data.documents import (
    Piece,
    document_pieces,
    iter_documents,
    iter_pieces,
    parse_hf_source,
    read_documents,
)

KINDS = ".txt/.txt.gz/.jsonl/.jsonl.gz/.parquet"
EXAMPLE = '{"text": "..."}'


def _refused(error, message, path, **kwargs):
    with pytest.raises(error) as info:
        read_documents(path, **kwargs)
    assert str(info.value) == message


def test_a_path_that_is_no_readable_source_is_named(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _refused(ValueError, f"input {corpus} is a directory; pass the files in it (e.g. "
             f"{corpus}/*.txt), each one of {KINDS}", corpus)  # fmt: skip
    _refused(FileNotFoundError, f"input file {tmp_path / 'a.txt'} does not exist; pass existing "
             f"{KINDS} files or a Hugging Face dataset as 'hf:NAME[:CONFIG][@SPLIT]'",
             tmp_path / "a.txt")  # fmt: skip
    (tmp_path / "a.csv").write_text("text\n")
    _refused(ValueError, f"unsupported input {tmp_path / 'a.csv'}: expected a file ending in "
             ".txt, .txt.gz, .jsonl, .jsonl.gz, .parquet", tmp_path / "a.csv")  # fmt: skip


def test_jsonl_refusals_name_the_line_and_the_fix(tmp_path):
    path = tmp_path / "a.jsonl"
    cases = [
        ('{"text": "ok"}\n\n{"text": \n', "a.jsonl:3 is not valid JSON (Expecting value); each "
         f"line of a .jsonl file must be one object such as {EXAMPLE}"),
        ('["a"]\n', f"a.jsonl:1 holds a JSON list, not an object; each line must be one object "
         f"such as {EXAMPLE}"),
        ('{"body": "x", "id": 1}\n', "a.jsonl:1 has no field 'text' (fields: ['body', 'id']); "
         "pass text_field=<name>"),
        ('{"text": ["x"]}\n', "a.jsonl:1: field 'text' is a list, not a string; fix the line or "
         "pass another text_field"),
    ]  # fmt: skip
    for content, message in cases:
        path.write_text(content)
        _refused(ValueError, f"{tmp_path}/{message}", path)
    path.write_text('{"text": " a "}\n  \n{"text": null}\n{"text": ""}\n{"text": "b"}\n')
    assert read_documents(path) == ["a", "b"]  # blank lines, null and empty texts dropped


def test_undecodable_text_and_broken_gzip_are_named(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"ok\n\ncaf\xe9\n")
    _refused(ValueError, f"{tmp_path / 'latin.txt'} is not UTF-8 text (byte b'\\xe9' cannot be "
             "decoded); convert it, e.g. iconv -f latin1 -t utf-8, or leave the binary file out",
             tmp_path / "latin.txt")  # fmt: skip
    with pytest.raises(ValueError) as info:  # read in pieces: the same line
        list(iter_pieces(tmp_path / "latin.txt"))
    assert str(info.value).startswith(f"{tmp_path / 'latin.txt'} is not UTF-8 text (byte b'")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl is not UTF-8 text \(byte b'\\xe9'"):
        read_documents(tmp_path / "latin.jsonl")
    (tmp_path / "fake.txt.gz").write_bytes(b"plain text")
    with pytest.raises(ValueError) as info:
        read_documents(tmp_path / "fake.txt.gz")
    assert str(info.value).startswith(f"{tmp_path / 'fake.txt.gz'} is not a valid gzip file (")
    assert str(info.value).endswith("); recompress it")


def test_suffixes_are_read_in_any_case(tmp_path):
    (tmp_path / "A.TXT").write_text("x\n\ny\n")
    (tmp_path / "B.JSONL.GZ").write_bytes(gzip.compress(b'{"text": "z"}\n'))
    assert read_documents(tmp_path / "A.TXT") == ["x", "y"]
    assert read_documents(tmp_path / "B.JSONL.GZ") == ["z"]
    assert [p.text for p in iter_pieces(str(tmp_path / "A.TXT"), max_chars=4)] == ["x", "y"]


def test_parquet_names_a_missing_column_and_a_missing_pyarrow(tmp_path, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    _refused(ValueError, f"{path} has no column 'text' (columns: ['body']); pass "
             "text_field=<name>", path)  # fmt: skip
    assert read_documents(path, text_field="body") == ["x"]
    pq.write_table(pa.table({"id": ["1", "2"], "text": ["a", " b "]}), path)
    assert read_documents(path) == ["a", "b"]  # the named column, wherever it stands
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    _refused(ValueError, f"reading {path} needs pyarrow: pip install pyarrow", path)


def test_hf_sources_follow_their_grammar(monkeypatch):
    assert parse_hf_source("hf:org/name") == ("org/name", None, "train")
    assert parse_hf_source("hf:org/name:cfg@test") == ("org/name", "cfg", "test")
    assert parse_hf_source("hf:name:@") == ("name", None, "train")  # empty parts: the defaults
    for bad in ("hf:", "hf::cfg", "hf:@test"):
        with pytest.raises(ValueError) as info:
            parse_hf_source(bad)
        assert str(info.value) == f"bad dataset source {bad!r}; expected 'hf:NAME[:CONFIG][@SPLIT]'"
    monkeypatch.setitem(sys.modules, "datasets", None)
    _refused(ValueError, "hf:org/name needs the `datasets` package: pip install 'xdlm[hf]'",
             "hf:org/name")  # fmt: skip


def test_hf_rows_without_the_field_are_named(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"b": "x", "a": "y"}])

    monkeypatch.setattr(datasets, "load_dataset", load)
    assert read_documents("hf:org/name:cfg@dev", text_field="b") == ["x"]
    assert calls == [("org/name", "cfg", "dev", True)]
    _refused(ValueError, "dataset hf:org/name has no column 'text' (columns: ['a', 'b']); pass "
             "text_field=<name>", "hf:org/name")  # fmt: skip
    assert [p.text for p in iter_pieces("hf:org/name", "b", max_chars=4)] == ["x"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf:org.txt").write_text("local\n")  # a file of the same name is not read
    assert [p.text for p in iter_pieces("hf:org.txt", "b")] == ["x"]


@pytest.mark.parametrize(
    "doc, max_chars, pieces",
    [
        ("aaa bbb ccc", 5, ["aaa", " bbb", " ccc"]),  # cut before the last space in reach
        ("ab\ncd ef", 5, ["ab", "\ncd", " ef"]),  # before a newline too
        ("a bcdefgh", 4, ["a", " bcd", "efgh"]),  # no whitespace after the start: at max_chars
        ("ab cdefg", 3, ["ab", " cd", "efg"]),  # a space at the piece's own start is no cut
        ("a b cdefgh", 5, ["a b", " cdef", "gh"]),  # the last of two spaces in reach
        ("a\nb\ncdefgh", 5, ["a\nb", "\ncdef", "gh"]),  # the last of two newlines
        ("a\nbcdefg", 4, ["a", "\nbcd", "efg"]),  # a newline right after the piece's start
        ("abcd", 4, ["abcd"]),  # exactly max_chars: one piece
        ("abcde", 4, ["abcd", "e"]),  # one past
    ],
)
def test_pieces_are_cut_before_the_last_whitespace_in_reach(tmp_path, doc, max_chars, pieces):
    flags = [(i == 0, i == len(pieces) - 1) for i in range(len(pieces))]
    want = [Piece(t, f, last) for t, (f, last) in zip(pieces, flags, strict=True)]
    assert list(document_pieces(doc, max_chars)) == want
    (tmp_path / "d.txt").write_text(doc)
    assert list(iter_pieces(tmp_path / "d.txt", max_chars=max_chars)) == want
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    assert list(iter_pieces(tmp_path / "d.jsonl", max_chars=max_chars)) == want


def test_a_document_longer_than_a_piece_is_read_whole(tmp_path):
    long = " ".join(f"w{i}" for i in range(60_000))  # ~350,000 characters: two pieces
    (tmp_path / "a.txt").write_text(f"{long}\n\nshort\n")
    assert read_documents(tmp_path / "a.txt") == [long, "short"]
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert list(iter_documents(tmp_path / "a.jsonl")) == ["x"]  # the field "text" by default


@pytest.mark.parametrize("kind", [Path, str])
@pytest.mark.parametrize("name", ["a.txt", "B.TXT", "c.txt.gz", "D.Txt.Gz"])
def test_a_text_file_is_read_in_pieces_never_whole(tmp_path, monkeypatch, name, kind):
    """Bounded memory: `iter_pieces` reads a .txt[.gz] piece by piece, never through
    `iter_documents` (which holds a whole document)."""
    text = b"aaa bbb ccc\n\nd\n"
    (tmp_path / name).write_bytes(gzip.compress(text) if name.lower().endswith(".gz") else text)

    def whole(*args):
        raise AssertionError("read as whole documents")

    monkeypatch.setattr(documents, "iter_documents", whole)
    pieces = list(iter_pieces(kind(tmp_path / name), max_chars=5))
    assert [p.text for p in pieces] == ["aaa", " bbb", " ccc", "d"]


def test_whitespace_is_held_in_memory_up_to_the_cap_then_in_a_file():
    held = documents._Held(4)
    held.add("  ")
    held.add("\t\n")  # exactly 4 characters: still in memory
    assert held.file is None and held.parts == ["  ", "\t\n"]
    held.add(" ")  # one past: all of it moves to a temporary file
    assert held.file is not None and held.parts == [] and held.size == 0
    held.add("\n")
    assert list(held.drain()) == ["  \t\n", " ", "\n"]  # the file in chunks of 4, then memory
    assert held.file is None and held.parts == [] and held.size == 0


@pytest.fixture
def ascii_locale():
    """LC_CTYPE=C (ASCII: a bare container, a cron job) in this process for one test, restored
    after. In-process, not a child under LC_ALL=C: such a child decodes its environment as ASCII
    and cannot match a mutmut mutant name holding "ǁ" (the temporary file's encoding)."""
    if sys.flags.utf8_mode:
        pytest.skip("Python's UTF-8 mode reads every locale as UTF-8")
    saved = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz"])
def test_text_is_read_as_utf_8_whatever_the_locale(tmp_path, name, ascii_locale):
    """Under an ASCII locale too: the file, and the run of 5 ideographic spaces held in a
    temporary file (over the cap of 4) before "b"."""
    text = "café\n\nna\u3000\u3000\u3000\u3000\u3000\nb\n".encode()
    (tmp_path / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    assert locale.getencoding() != "UTF-8"  # what open() would take without an encoding
    pieces = [p.text for p in iter_pieces(tmp_path / name, max_chars=4)]
    assert pieces == ["café", "na\u3000\u3000", "\u3000" * 3, "\nb"]
