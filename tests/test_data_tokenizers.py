import gzip
import json

import pytest

from xdlm.data import embedded_corpus_path, load_tokenizer, load_tokenizer_dir, split_documents
from xdlm.data.tokenizers import TextTokenizer

SAMPLE = 'It is a truth universally acknowledged, that a single man --\n"Mr. Bennet," 1813!'
LITERAL_SPECIALS = "x [MASK] [PAD] [BOS] [EOS] [CLS] [SEP] [UNK] <|endoftext|> y"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    with gzip.open(embedded_corpus_path(), "rt", encoding="utf-8") as f:
        return split_documents(f.read())[:300]


def _build(kind: str, corpus: list[str], shared) -> TextTokenizer:
    if kind == "char":
        return load_tokenizer("char", corpus_texts=corpus)
    if kind == "bpe":
        return load_tokenizer("bpe", corpus_texts=corpus, vocab_size=400)
    if kind == "gpt2":
        return load_tokenizer("gpt2", shared / "tokenizers" / "gpt2")
    return load_tokenizer("bert-base-uncased", shared / "tokenizers" / "bert-base-uncased")


@pytest.fixture(params=["char", "bpe", "gpt2", "bert"])
def tok(request, corpus) -> TextTokenizer:
    shared = None
    if request.param in ("gpt2", "bert"):
        shared = request.getfixturevalue("shared_data")
    return _build(request.param, corpus, shared)


def test_gpt2_matches_reference_ids(shared_data):
    tok = load_tokenizer("gpt2", shared_data / "tokenizers" / "gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256  # <|endoftext|>
    assert tok.vocab_size == 50260 and tok.mask_id == tok.vocab_size - 1
    assert tok.encode_batch(["Hello world", "Hello"]) == [[15496, 995], [15496]]


def test_bert_uses_its_own_specials(shared_data):
    vocab = shared_data / "tokenizers" / "bert-base-uncased" / "vocab.txt"
    for source in (vocab, vocab.parent):
        tok = load_tokenizer("bert-base-uncased", source)
        assert tok.special_ids == {"bos": 101, "eos": 102, "pad": 0, "mask": 103}
        assert tok.vocab_size == 30522
        assert tok.encode("Hello World") == tok.encode("hello world")
    assert load_tokenizer("wordpiece", vocab).spec["kind"] == "wordpiece"


def test_special_ids_distinct_and_never_produced_by_text(tok, corpus):
    specials = set(tok.special_ids.values())
    assert len(specials) == 4 and all(0 <= i < tok.vocab_size for i in specials)
    for ids in tok.encode_batch(corpus[:50] + [LITERAL_SPECIALS]):
        assert specials.isdisjoint(ids)
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_decode_skips_specials(tok):
    ids = tok.encode(SAMPLE)
    wrapped = [tok.bos_id, *ids, tok.eos_id, tok.mask_id, tok.pad_id, tok.pad_id]
    assert tok.decode(wrapped) == tok.decode(ids)
    text = tok.decode([tok.mask_id, *ids, tok.pad_id])
    for special in tok.special_tokens.values():
        assert special not in text
    assert tok.special_tokens["mask"] in tok.decode([tok.mask_id], skip_special=False)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_trained(kind, corpus):
    tok = _build(kind, corpus, None)
    for text in [SAMPLE, *corpus[:20]]:
        assert tok.decode(tok.encode(text)) == text


def test_round_trip_gpt2(shared_data):
    tok = _build("gpt2", [], shared_data)
    for text in [SAMPLE, LITERAL_SPECIALS, "naïve café — ünïcödé\n\n  spaces"]:
        assert tok.decode(tok.encode(text)) == text


def test_round_trip_bert_up_to_lowercase(shared_data):
    tok = _build("bert", [], shared_data)
    assert tok.decode(tok.encode("Hello World, how are you")) == "hello world, how are you"


def test_save_load_identity(tok, tmp_path, corpus):
    tok.save(tmp_path / "new" / "tok")  # its parents are created
    tok.save(tmp_path / "new" / "tok")  # and an existing directory is written again
    again = load_tokenizer_dir(tmp_path / "new" / "tok")
    assert again.special_ids == tok.special_ids
    assert again.vocab_size == tok.vocab_size and again.spec == tok.spec
    texts = [SAMPLE, LITERAL_SPECIALS, *corpus[:10]]
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    ids = tok.encode(SAMPLE) + [tok.mask_id]
    assert again.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_trained_tokenizers_deterministic(kind, corpus, tmp_path):
    a = _build(kind, corpus, None).save(tmp_path / "a") / "tokenizer.json"
    b = _build(kind, list(corpus), None).save(tmp_path / "b") / "tokenizer.json"
    assert a.read_bytes() == b.read_bytes()


def test_char_vocab_sorted_with_unk():
    tok = load_tokenizer("char", corpus_texts=["cab", "ba d"])
    assert tok.encode(" abcd") == [0, 1, 2, 3, 4]
    assert tok.vocab_size == 5 + 1 + 4  # chars, [UNK], four specials
    unk = tok.encode("z")
    assert len(unk) == 1 and unk[0] not in tok.special_ids.values()


def test_bpe_vocab_size_is_total(corpus):
    tok = load_tokenizer("bpe", corpus_texts=corpus, vocab_size=300)
    assert tok.vocab_size == 300


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="needs corpus_texts"):
        load_tokenizer("char")
    with pytest.raises(ValueError, match="vocab_size >= 261"):
        load_tokenizer("bpe", corpus_texts=["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="needs source"):
        load_tokenizer("wordpiece")
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_tokenizer("gpt2", tmp_path)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_tokenizer("bert-base-uncased", tmp_path)
    with pytest.raises(FileNotFoundError, match="TextTokenizer.save"):
        load_tokenizer_dir(tmp_path)


def test_hf_kind_keeps_distinct_specials(shared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    g = shared_data / "tokenizers" / "gpt2"
    merges = (g / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    vocab = json.loads((g / "encoder.json").read_text(encoding="utf-8"))
    hf = transformers.GPT2TokenizerFast(vocab=vocab, merges=[tuple(m.split()) for m in merges if m])
    hf.save_pretrained(tmp_path / "hf")
    tok = load_tokenizer("hf", tmp_path / "hf")
    assert tok.encode("Hello world") == [15496, 995]
    ids = tok.special_ids
    assert len(set(ids.values())) == 4 and ids["eos"] == 50256  # <|endoftext|> is EOS only
    assert tok.decode(tok.encode("Hello world") + [tok.mask_id]) == "Hello world"
    with pytest.raises(ValueError, match="needs source"):
        load_tokenizer("hf")


def test_gpt2_mdlm_mode_matches_the_released_models(shared_data, tmp_path):
    """MDLM / Duo / XDLM OWT: V = 50,258, [MASK] = 50,257, BOS = EOS = PAD = 50,256."""
    tok = load_tokenizer("gpt2-mdlm", shared_data / "tokenizers" / "gpt2")
    assert tok.vocab_size == 50_258
    assert tok.special_ids == {"bos": 50_256, "eos": 50_256, "pad": 50_256, "mask": 50_257}
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([50_256, 15496, 995, 50_257, 50_256]) == "Hello world"
    again = load_tokenizer_dir(tok.save(tmp_path / "tok"))
    assert again.special_ids == tok.special_ids and again.shared == ("bos", "eos", "pad")


def test_shared_ids_only_where_named():
    from tokenizers import Tokenizer, models

    base = Tokenizer(models.WordLevel({"a": 0, "[E]": 1, "[M]": 2, "[B]": 3}, unk_token="a"))
    shared = {"bos": "[E]", "eos": "[E]", "pad": "[E]", "mask": "[M]"}
    with pytest.raises(ValueError) as info:
        TextTokenizer(base, shared, {"kind": "x", "source": "x"})
    assert str(info.value) == (
        "special ids must be distinct, got {'bos': 1, 'eos': 1, 'pad': 1, 'mask': 2}; only the "
        "roles in shared=[] may share one id (the tokenizer kind 'gpt2-mdlm' shares BOS = EOS = "
        "PAD)"
    )
    with pytest.raises(ValueError, match="must be distinct"):  # one shared role, on eos's id
        TextTokenizer(base, {**shared, "bos": "[B]"}, {"kind": "x"}, shared=("pad",))
    with pytest.raises(ValueError, match="must be distinct"):  # shared roles on two ids
        TextTokenizer(base, {**shared, "bos": "a", "pad": "[B]"}, {"kind": "x"},
                      shared=("eos", "pad"))  # fmt: skip
    tok = TextTokenizer(base, shared, {"kind": "x"}, shared=("bos", "eos", "pad"))
    assert tok.eos_id == 1
    other = TextTokenizer(base, {**shared, "bos": "[B]"}, {"kind": "x"}, shared=("eos", "pad"))
    assert other.fingerprint() != tok.fingerprint()  # one vocabulary, other special tokens
    mask_too = {**shared, "mask": "[E]"}
    with pytest.raises(ValueError, match="only bos, eos and pad"):
        TextTokenizer(base, mask_too, {"kind": "x"}, shared=("bos", "eos", "pad", "mask"))


@pytest.mark.parametrize(
    "data, text",
    [
        ("é".encode()[1:] + b"ab" + "中".encode()[:2], "ab"),  # cut at both ends: left out
        ("a—b".encode(), "a—b"),
        (b"a\xe2b", "a\ufffdb"),  # a lead byte without its continuation, inside: invalid
        (b"\x80\x80\x80\x80x", "\ufffdx"),  # at most 3 bytes can belong to a cut character
        ("😀".encode()[:3], ""),
        (b"", ""),
    ],
)
def test_utf8_text_drops_cut_characters_and_replaces_invalid_bytes(data, text):
    from xdlm.data.bytelevel import utf8_text

    assert utf8_text(data) == text


def test_bytelevel_decode_keeps_characters_split_across_tokens(corpus):
    """Regression (issue 32): samples printed "�" where a token boundary split a multi-byte
    character. A 400-id BPE has no token for "é" or "中": their bytes are separate tokens."""
    from xdlm.data.bytelevel import byte_of_char

    tok = _build("bpe", corpus, None)
    text = "naïve café — 中文 it’s"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    token_of = {b: tok._tok.token_to_id(c) for c, b in byte_of_char().items()}
    cafe = tok.encode("café")
    assert cafe[-2:] == [token_of[0xC3], token_of[0xA9]]  # é = C3 A9, one token per byte
    masked = [*cafe[:-1], tok.mask_id, cafe[-1], *tok.encode(" ok")]
    assert tok.decode(masked, skip_special=False) == "caf[MASK] ok"  # cut halves left out
    assert tok.decode(masked) == "caf ok"
    window = tok.encode("中文")[1:]  # a row cut out of a longer text starts mid-character
    assert tok.decode(window) == "文"
    invalid = [*tok.encode("a"), token_of[0xC3], *tok.encode("b")]
    assert tok.decode(invalid) == "a\ufffdb"  # only a truly invalid byte is replaced


def _refused(error, message, call, *args, **kwargs):
    """`call` raises `error` with exactly `message` (one line naming the value and the fix)."""
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    assert str(info.value) == message


def test_every_tokenizer_refusal_is_one_line_naming_the_fix(tmp_path):
    kinds = "gpt2, gpt2-mdlm, bert-base-uncased, wordpiece, char, bpe, hf"
    unknown = f"unknown tokenizer kind 'spm'; choose one of {kinds}"
    _refused(ValueError, unknown, load_tokenizer, "spm")
    for kind in ("char", "bpe"):
        need = f"tokenizer kind {kind!r} needs corpus_texts to build its vocabulary"
        _refused(ValueError, need, load_tokenizer, kind, corpus_texts=[], vocab_size=300)
    _refused(ValueError, "tokenizer kind 'char' needs corpus_texts holding some text",
             load_tokenizer, "char", corpus_texts=iter([""]))  # fmt: skip
    bpe = "tokenizer kind 'bpe' needs vocab_size >= 261 (256 bytes + specials), got 260"
    _refused(ValueError, bpe, load_tokenizer, "bpe", corpus_texts=["abc"], vocab_size=260)
    assert load_tokenizer("bpe", corpus_texts=["abc abd"], vocab_size=261).vocab_size == 261
    _refused(ValueError, "kind 'wordpiece' needs source=<vocab.txt or its dir or hub name>",
             load_tokenizer, "wordpiece")  # fmt: skip
    _refused(ValueError, "tokenizer kind 'hf' needs source=<local dir or hub name>",
             load_tokenizer, "hf")  # fmt: skip
    _refused(FileNotFoundError, f"gpt2 tokenizer dir {tmp_path} needs encoder.json and vocab.bpe",
             load_tokenizer, "gpt2", tmp_path)  # fmt: skip
    missing = tmp_path / "vocab.txt"
    _refused(FileNotFoundError, f"no WordPiece vocab at {missing}; pass a vocab.txt or its dir",
             load_tokenizer, "wordpiece", missing)  # fmt: skip
    saved = (f"{tmp_path} holds no saved tokenizer (tokenizer.json + xdlm_tokenizer.json); "
             "write one with TextTokenizer.save(dir)")  # fmt: skip
    _refused(FileNotFoundError, saved, load_tokenizer_dir, tmp_path)


def _tiny_gpt2(directory):
    """A GPT-2 layout (encoder.json + vocab.bpe) with 3 ids and no merges."""
    directory.mkdir()
    (directory / "encoder.json").write_text(json.dumps({"a": 0, "b": 1, "<|endoftext|>": 2}))
    (directory / "vocab.bpe").write_text("#version: 0.2\n")
    return directory


def test_a_gpt2_directory_builds_gpt2_and_gpt2_mdlm_only_at_50257_ids(tmp_path):
    gpt2 = _tiny_gpt2(tmp_path / "gpt2")
    tok = load_tokenizer("gpt2", gpt2)
    assert tok.special_ids == {"bos": 3, "eos": 2, "pad": 4, "mask": 5} and tok.vocab_size == 6
    assert tok.encode("ab") == [0, 1] and tok.decode([3, 0, 5, 1, 2]) == "ab"
    assert tok.special_tokens == {"bos": "[BOS]", "eos": "<|endoftext|>", "pad": "[PAD]",
                                  "mask": "[MASK]"}  # fmt: skip
    assert tok.spec == {"kind": "gpt2", "source": str(gpt2), "vocab_size": 6}
    _refused(ValueError, f"gpt2-mdlm needs the 50,257-token GPT-2 vocabulary, got 3 ids from "
             f"{gpt2}", load_tokenizer, "gpt2-mdlm", gpt2)  # fmt: skip


def test_a_damaged_tokenizer_directory_is_named(tmp_path, corpus):
    directory = load_tokenizer("char", corpus_texts=corpus[:5]).save(tmp_path / "tok")
    meta = directory / "xdlm_tokenizer.json"
    record = json.loads(meta.read_text())
    record["special_tokens"]["mask"] = "[NOPE]"
    meta.write_text(json.dumps(record))
    _refused(ValueError, f"{meta}: special token '[NOPE]' (mask) is not in vocab; restore the "
             "tokenizer directory", load_tokenizer_dir, directory)  # fmt: skip
    (directory / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ValueError) as info:
        load_tokenizer_dir(directory)
    message = str(info.value)
    assert message.startswith(f"{directory / 'tokenizer.json'} is not a tokenizers JSON file (")
    assert message.endswith("); the file is truncated, emptied or foreign: restore it")
    assert "EOF while parsing" in message  # the loader's own reason
    (directory / "tokenizer.json").write_text(json.dumps({"version": "x" * 300}))
    with pytest.raises(ValueError) as info:  # a long reason is cut at 200 characters
        load_tokenizer_dir(directory)
    head = f"{directory / 'tokenizer.json'} is not a tokenizers JSON file ("
    reason = str(info.value).removeprefix(head).split(");")[0]
    assert reason == "Unknown tokenizer version '" + "x" * 173


def test_a_hub_name_is_fetched_as_tokenizer_json_and_a_failure_named(tmp_path, monkeypatch):
    import xdlm.data.tokenizers as tokenizers_module

    local = load_tokenizer("gpt2", _tiny_gpt2(tmp_path / "gpt2"))._tok
    asked = []

    class Hub:
        @staticmethod
        def from_pretrained(name):
            asked.append(name)
            if name == "org/offline":
                raise OSError("no network")
            return local

    monkeypatch.setattr(tokenizers_module, "Tokenizer", Hub)
    tok = load_tokenizer("gpt2", "org/tok")
    assert tok.spec["source"] == "org/tok" and tok.encode("ab") == [0, 1] and asked == ["org/tok"]
    assert load_tokenizer("bert-base-uncased").spec["source"] == "bert-base-uncased"
    assert asked[-1] == "bert-base-uncased"  # the default source of the kind
    assert load_tokenizer("gpt2").spec["source"] == "gpt2" and asked[-1] == "gpt2"
    with pytest.raises(ValueError, match=r"needs the 50,257-token GPT-2 vocabulary, got \d+ ids "
                       r"from gpt2$"):  # fmt: skip
        load_tokenizer("gpt2-mdlm")
    assert asked[-1] == "gpt2"
    for kind in ("wordpiece", "gpt2"):
        _refused(ValueError, f"could not load {kind} tokenizer 'org/offline' from the HF hub (no "
                 "network); pass source=<local dir> instead", load_tokenizer, kind,
                 "org/offline")  # fmt: skip


def test_a_wordpiece_vocab_lowercases_joins_pieces_and_maps_the_unknown(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n##s\nworld\n")
    for source in (vocab, tmp_path):  # the file or its directory
        tok = load_tokenizer("wordpiece", source)
        assert tok.spec == {"kind": "wordpiece", "source": str(source), "vocab_size": 8}
        assert tok.special_ids == {"bos": 2, "eos": 3, "pad": 0, "mask": 4}
        assert tok.encode("HELLOs world \u2603") == [5, 6, 7, 1]  # lowercased; [UNK] = 1
        assert tok.decode([2, 5, 6, 7, 3, 0]) == "hellos world"


def test_a_saved_tokenizer_reads_back_its_fields_each_checked(tmp_path):
    tok = load_tokenizer("gpt2", _tiny_gpt2(tmp_path / "gpt2"))
    assert repr(tok) == (
        f"TextTokenizer({{'kind': 'gpt2', 'source': '{tmp_path / 'gpt2'}', 'vocab_size': 6}}, "
        "special_ids={'bos': 3, 'eos': 2, 'pad': 4, 'mask': 5})"
    )
    directory = tok.save(tmp_path / "tok")
    again = load_tokenizer_dir(directory)
    assert again.fingerprint() == tok.fingerprint() and again.shared == ()
    meta_path = directory / "xdlm_tokenizer.json"
    meta = json.loads(meta_path.read_text())
    assert meta == {"shared": [], "spec": tok.spec, "special_tokens": tok.special_tokens}
    del meta["shared"]  # written before roles could be shared: none are
    meta_path.write_text(json.dumps(meta))
    assert load_tokenizer_dir(directory).special_ids == tok.special_ids
    del meta["special_tokens"]["pad"]
    meta_path.write_text(json.dumps(meta))
    _refused(ValueError, f"{meta_path}: special_tokens: the key 'pad' is missing; the file was "
             "edited or is foreign, restore it", load_tokenizer_dir, directory)  # fmt: skip
    meta_path.write_text(json.dumps({**meta, "spec": []}))
    _refused(ValueError, f"{meta_path}: spec must be dict, got []", load_tokenizer_dir,
             directory)  # fmt: skip
    meta_path.write_text(json.dumps({"spec": meta["spec"]}))
    _refused(ValueError, f"{meta_path}: the key 'special_tokens' is missing; the file was edited "
             "or is foreign, restore it", load_tokenizer_dir, directory)  # fmt: skip
    meta_path.write_text("{")
    with pytest.raises(ValueError, match=r"\(the special tokens of a saved tokenizer\) is not "):
        load_tokenizer_dir(directory)
    meta_path.unlink()  # one of the two files is not a saved tokenizer
    with pytest.raises(FileNotFoundError, match="holds no saved tokenizer"):
        load_tokenizer_dir(directory)


def test_gpt2_mdlm_from_a_50257_token_directory(tmp_path):
    """The released models' layout without the real vocabulary: 50,256 plain tokens and
    <|endoftext|>; its literal text and "[MASK]" in a document are never special ids."""
    directory = tmp_path / "gpt2"
    directory.mkdir()
    encoder = {"a": 0, **{f"t{i}": i for i in range(1, 50_256)}, "<|endoftext|>": 50_256}
    (directory / "encoder.json").write_text(json.dumps(encoder))
    (directory / "vocab.bpe").write_text("#version: 0.2\n")
    tok = load_tokenizer("gpt2-mdlm", directory)
    assert tok.spec == {"kind": "gpt2-mdlm", "source": str(directory), "vocab_size": 50_258}
    assert tok.special_ids == {"bos": 50_256, "eos": 50_256, "pad": 50_256, "mask": 50_257}
    assert tok.special_tokens == {"bos": "<|endoftext|>", "eos": "<|endoftext|>",
                                  "pad": "<|endoftext|>", "mask": "[MASK]"}  # fmt: skip
    assert tok.encode("a<|endoftext|>a[MASK]a") == [0, 0, 0]
    saved = json.loads((tok.save(tmp_path / "tok") / "tokenizer.json").read_text())
    added = {(t["id"], t["content"], t["special"]) for t in saved["added_tokens"]}
    assert added == {(50_256, "<|endoftext|>", True), (50_257, "[MASK]", True)}  # as released
