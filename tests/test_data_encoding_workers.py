"""The start method of `encode_stream`'s tokenizer workers (issue 29): fork wherever the platform
has it, whatever the program's default (Python 3.14 makes forkserver the Linux default, and a
program may have chosen spawn), and spawn where there is no fork."""

import multiprocessing

import pytest

from xdlm.data import encoding, load_tokenizer
from xdlm.data.encoding import encode_stream


@pytest.fixture
def pool_contexts(monkeypatch):
    """The start method of every pool `encode_stream` opens (its `mp_context`)."""
    seen = []

    class Recording(encoding.ProcessPoolExecutor):
        def __init__(self, *args, mp_context=None, **kwargs):
            seen.append(None if mp_context is None else mp_context.get_start_method())
            super().__init__(*args, mp_context=mp_context, **kwargs)

    monkeypatch.setattr(encoding, "ProcessPoolExecutor", Recording)
    return seen


def _encode_two(tmp_path) -> list[list[int]]:
    tok = load_tokenizer("char", corpus_texts=["ab"])
    tok.save(tmp_path / "tok")
    stream = encode_stream(iter([["ab"], ["ba"]]), tok, tmp_path / "tok", 2)
    return [batch.ids.tolist() for batch in stream]


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_workers_are_forked_even_when_the_program_defaults_to_spawn(tmp_path, pool_contexts):
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        ids = _encode_two(tmp_path)
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert pool_contexts == ["fork"]
    assert ids == [[3, 0, 1, 4], [3, 1, 0, 4]]  # a b [UNK] [BOS] [EOS]


def test_a_platform_without_fork_spawns_the_workers(tmp_path, pool_contexts, monkeypatch):
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn", "forkserver"])
    assert _encode_two(tmp_path) == [[3, 0, 1, 4], [3, 1, 0, 4]]
    assert pool_contexts == ["spawn"]
