"""Text tokenizers for diffusion LMs: a thin wrapper over HF `tokenizers` with four special ids.

A diffusion LM outputs logits over `vocab_size` ids, which INCLUDES the absorbing mask id `m`
(paper: the mask state of the mixed kernel). `TextTokenizer` guarantees that `mask_id`, `pad_id`,
`bos_id` and `eos_id` are four distinct ids (unless a kind names roles that share one, see
`gpt2-mdlm`), none of which an ordinary token maps to; special
tokens the base vocabulary lacks are appended at the end (so for GPT-2, `mask_id = V - 1`).
Literal special-token text inside documents (e.g. the string "[MASK]") is encoded as ordinary
text, never as a special id.

Builders (`load_tokenizer(kind, ...)`):
  - `gpt2`: byte-level BPE from a local dir with encoder.json + vocab.bpe, or a hub name
    (default "gpt2"). <|endoftext|> is EOS; [BOS], [PAD], [MASK] are added.
  - `gpt2-mdlm`: GPT-2 exactly as the released MDLM / Duo / XDLM OpenWebText models use it:
    V = 50,258 with [MASK] = 50,257 and <|endoftext|> = 50,256 as BOS = EOS = PAD (the one
    named exception to distinct special ids: `shared=("bos", "eos", "pad")`). PAD is only a
    stand-in: those models were trained on wrapped rows and never see padding.
  - `bert-base-uncased` / `wordpiece`: WordPiece from a vocab.txt (or a dir holding one) with
    BERT lowercasing, or a hub name. [CLS] is BOS, [SEP] is EOS, [PAD], [MASK] as in BERT.
  - `char`: one id per character of the corpus (sorted, deterministic) + [UNK] and specials.
  - `bpe`: byte-level BPE trained on the corpus with `vocab_size` total ids (specials included).
  - `hf`: any fast tokenizer `transformers.AutoTokenizer` loads (local dir or hub name, e.g.
    GSAI-ML/LLaDA-8B-Base); its own mask/pad/bos/eos tokens are kept where they exist and are
    distinct (LLaDA's mask is `<|mdm_mask|>`), the missing ones are appended.

`TextTokenizer.save(dir)` writes `tokenizer.json` + `xdlm_tokenizer.json`; `load_tokenizer_dir`
rebuilds it from that directory alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.trainers import BpeTrainer

from xdlm.data.bytelevel import token_bytes, utf8_text
from xdlm.files import read_json, require

KINDS = ("gpt2", "gpt2-mdlm", "bert-base-uncased", "wordpiece", "char", "bpe", "hf")
_ROLES = ("bos", "eos", "pad", "mask")
_META_FILE = "xdlm_tokenizer.json"
_HF_FILE = "tokenizer.json"
_DEFAULT_SPECIALS = {"bos": "[BOS]", "eos": "[EOS]", "pad": "[PAD]", "mask": "[MASK]"}


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the four special ids a diffusion LM needs.

    Args:
        tokenizer: the HF tokenizer (its post-processor is ignored: `encode` adds no specials).
        special_tokens: role -> token string for "bos", "eos", "pad", "mask"; each must already
            be in the tokenizer's vocabulary.
        spec: small JSON-able dict recorded in manifests, at least {"kind", "source"}.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        special_tokens: dict[str, str],
        spec: dict,
        shared: Sequence[str] = (),
    ):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # literal "[MASK]" in text is ordinary text
        self.special_tokens = dict(special_tokens)
        self.shared = tuple(shared)
        ids = {}
        for role in _ROLES:
            token_id = tokenizer.token_to_id(special_tokens[role])
            if token_id is None:
                raise ValueError(f"special token {special_tokens[role]!r} ({role}) is not in vocab")
            ids[role] = token_id
        _check_distinct(ids, self.shared)
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id, self.mask_id = ids["pad"], ids["mask"]
        self.spec = {**spec, "vocab_size": self.vocab_size}

    @property
    def vocab_size(self) -> int:
        """Number of ids the model outputs over, mask and other specials included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        return {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "mask": self.mask_id}

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no BOS/EOS added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> one id list per text (no BOS/EOS added); parallel inside `tokenizers`."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids -> text. With `skip_special`, BOS/EOS/PAD/MASK (and other specials) emit nothing.
        Byte-level BPE decodes each run between added tokens at once: a character split across
        tokens comes out whole, one cut off at a run's end is left out, and only invalid bytes
        inside become U+FFFD (`xdlm.data.bytelevel`)."""
        ids = [int(i) for i in ids]
        if isinstance(self._tok.decoder, decoders.ByteLevel):
            return self._decode_bytes(ids, skip_special)
        if skip_special:
            drop = set(self.special_ids.values())
            ids = [i for i in ids if i not in drop]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def _decode_bytes(self, ids: list[int], skip_special: bool) -> str:
        added = self._tok.get_added_tokens_decoder()
        special = set(self.special_ids.values()) | {i for i, t in added.items() if t.special}
        parts, run = [], bytearray()
        for i in ids:
            if i not in added and i not in special:
                run += token_bytes(self._tok.id_to_token(i))
                continue
            parts.append(utf8_text(bytes(run)))
            run.clear()
            if not (skip_special and i in special):
                parts.append(added[i].content if i in added else self._tok.id_to_token(i))
        return "".join(parts) + utf8_text(bytes(run))

    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer's serialized form (vocabulary, merges, normalizer,
        pre-tokenizer: `tokenizer.json`) and its special tokens. Equal fingerprints tokenize
        alike; data and a run recorded with different ones must not be mixed."""
        digest = hashlib.sha256(self._tok.to_str().encode())
        digest.update(json.dumps(self.special_tokens, sort_keys=True).encode())
        return digest.hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and `xdlm_tokenizer.json` into `directory` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / _HF_FILE))
        meta = {"special_tokens": self.special_tokens, "spec": self.spec, "shared": self.shared}
        (directory / _META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    def __repr__(self) -> str:
        return f"TextTokenizer({self.spec}, special_ids={self.special_ids})"


def load_tokenizer_dir(directory: str | Path) -> TextTokenizer:
    """Rebuild a tokenizer written by `TextTokenizer.save` (needs nothing but that directory)."""
    directory = Path(directory)
    meta_path = directory / _META_FILE
    if not meta_path.is_file() or not (directory / _HF_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} holds no saved tokenizer ({_HF_FILE} + {_META_FILE}); "
            "write one with TextTokenizer.save(dir)"
        )
    meta = read_json(meta_path, "the special tokens of a saved tokenizer")
    require(meta, str(meta_path), special_tokens=dict, spec=dict)
    require(meta["special_tokens"], f"{meta_path}: special_tokens", **dict.fromkeys(_ROLES, str))
    try:
        tok = Tokenizer.from_file(str(directory / _HF_FILE))
    except Exception as err:  # the Rust loader raises a bare Exception for any malformed file
        raise ValueError(
            f"{directory / _HF_FILE} is not a tokenizers JSON file ({str(err)[:200]}); the file "
            "is truncated, emptied or foreign: restore it"
        ) from None
    spec = {k: v for k, v in meta["spec"].items() if k != "vocab_size"}
    try:
        return TextTokenizer(tok, meta["special_tokens"], spec, shared=meta.get("shared", ()))
    except ValueError as err:
        raise ValueError(f"{meta_path}: {err}; restore the tokenizer directory") from None


def _check_distinct(ids: dict[str, int], shared: Sequence[str]) -> None:
    """The mask id is always its own; other roles are distinct unless named in `shared`
    (roles in `shared` may share one id with each other, e.g. GPT-2's BOS = EOS = PAD)."""
    unknown = set(shared) - {"bos", "eos", "pad"}
    if unknown:
        raise ValueError(f"only bos, eos and pad may share an id, got shared={sorted(unknown)}")
    own = [ids[r] for r in _ROLES if r not in shared]
    pooled = {ids[r] for r in shared}
    if len(set(own)) != len(own) or (pooled & set(own)) or len(pooled) > 1:
        raise ValueError(
            f"special ids must be distinct, got {ids}; only the roles in shared={list(shared)} "
            "may share one id (the tokenizer kind 'gpt2-mdlm' shares BOS = EOS = PAD)"
        )


def load_tokenizer(
    kind: str,
    source: str | Path | None = None,
    corpus_texts: Iterable[str] | None = None,
    vocab_size: int | None = None,
) -> TextTokenizer:
    """Build a tokenizer by kind (see module docstring).

    Args:
        kind: one of `KINDS`.
        source: local dir/file or HF hub name (gpt2, bert-base-uncased, wordpiece).
        corpus_texts: training texts (char, bpe), any iterable: read once, never listed.
        vocab_size: total ids for the trained `bpe`, specials included.
    """
    if kind == "gpt2":
        return _gpt2(source or "gpt2")
    if kind == "gpt2-mdlm":
        return _gpt2_mdlm(source or "gpt2")
    if kind in ("bert-base-uncased", "wordpiece"):
        if kind == "wordpiece" and source is None:
            raise ValueError("kind 'wordpiece' needs source=<vocab.txt or its dir or hub name>")
        return _wordpiece(kind, source or "bert-base-uncased")
    if kind == "hf":
        if source is None:
            raise ValueError("tokenizer kind 'hf' needs source=<local dir or hub name>")
        return _hf(source)
    if kind in ("char", "bpe"):
        if corpus_texts is None or (isinstance(corpus_texts, Sequence) and not corpus_texts):
            raise ValueError(f"tokenizer kind {kind!r} needs corpus_texts to build its vocabulary")
        if kind == "char":
            return _char(corpus_texts)
        return _bpe(corpus_texts, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")


def _add_specials(tok: Tokenizer, specials: dict[str, str]) -> None:
    """Register specials (existing tokens keep their ids, missing ones are appended in order)."""
    tok.add_special_tokens([AddedToken(specials[r], special=True) for r in _ROLES])


def _gpt2(source: str | Path) -> TextTokenizer:
    tok = _gpt2_base(source)
    specials = {"bos": "[BOS]", "eos": "<|endoftext|>", "pad": "[PAD]", "mask": "[MASK]"}
    _add_specials(tok, {r: specials[r] for r in _ROLES})
    return TextTokenizer(tok, specials, {"kind": "gpt2", "source": str(source)})


def _gpt2_base(source: str | Path) -> Tokenizer:
    path = Path(source)
    if not path.is_dir():
        return _from_hub(str(source), "gpt2")
    files = [path / "encoder.json", path / "vocab.bpe"]
    if not all(f.is_file() for f in files):
        raise FileNotFoundError(f"gpt2 tokenizer dir {path} needs encoder.json and vocab.bpe")
    tok = Tokenizer(models.BPE.from_file(str(files[0]), str(files[1])))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _gpt2_mdlm(source: str | Path) -> TextTokenizer:
    """GPT-2 exactly as the MDLM / Duo / XDLM OpenWebText models use it: the 50,257 BPE ids, then
    [MASK] = 50,257 (V = 50,258); <|endoftext|> = 50,256 is BOS, EOS and PAD at once."""
    tok = _gpt2_base(source)
    if tok.get_vocab_size(with_added_tokens=True) != 50_257:
        raise ValueError(
            f"gpt2-mdlm needs the 50,257-token GPT-2 vocabulary, got "
            f"{tok.get_vocab_size(with_added_tokens=True)} ids from {source}"
        )
    eot = "<|endoftext|>"
    tok.add_special_tokens([AddedToken(eot, special=True), AddedToken("[MASK]", special=True)])
    specials = {"bos": eot, "eos": eot, "pad": eot, "mask": "[MASK]"}
    spec = {"kind": "gpt2-mdlm", "source": str(source)}
    return TextTokenizer(tok, specials, spec, shared=("bos", "eos", "pad"))


def _wordpiece(kind: str, source: str | Path) -> TextTokenizer:
    path = Path(source)
    vocab_file = path / "vocab.txt" if path.is_dir() else path
    if vocab_file.is_file():
        tok = Tokenizer(models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
    elif path.suffix == ".txt" or path.is_dir():
        raise FileNotFoundError(f"no WordPiece vocab at {vocab_file}; pass a vocab.txt or its dir")
    else:
        tok = _from_hub(str(source), kind)
    specials = {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"}
    _add_specials(tok, specials)
    return TextTokenizer(tok, specials, {"kind": kind, "source": str(source)})


_HF_MASK_NAMES = ("<|mdm_mask|>", "[MASK]", "<mask>")


def _hf(source: str | Path) -> TextTokenizer:
    """A transformers fast tokenizer's backend with four distinct special tokens."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(source))
    except Exception as err:  # network / missing files come in many types
        raise ValueError(
            f"could not load tokenizer {str(source)!r} with AutoTokenizer ({err}); "
            "pass a local directory saved with save_pretrained"
        ) from err
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"tokenizer {source!r} has no fast (tokenizers) backend; convert it first")
    tok = hf.backend_tokenizer
    vocab = tok.get_vocab(with_added_tokens=True)
    mask = hf.mask_token or next((t for t in _HF_MASK_NAMES if t in vocab), "[MASK]")
    specials = {"mask": mask, "eos": hf.eos_token or "[EOS]"}
    specials["bos"] = hf.bos_token if hf.bos_token not in (None, *specials.values()) else "[BOS]"
    specials["pad"] = hf.pad_token if hf.pad_token not in (None, *specials.values()) else "[PAD]"
    _add_specials(tok, specials)
    return TextTokenizer(tok, specials, {"kind": "hf", "source": str(source)})


def _from_hub(name: str, kind: str) -> Tokenizer:
    """Download `tokenizer.json` of a hub repo (needs internet)."""
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as err:  # network / missing repo errors come in many types
        raise ValueError(
            f"could not load {kind} tokenizer {name!r} from the HF hub ({err}); "
            "pass source=<local dir> instead"
        ) from err


def _char(texts: Iterable[str]) -> TextTokenizer:
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    if not seen:
        raise ValueError("tokenizer kind 'char' needs corpus_texts holding some text")
    vocab = {c: i for i, c in enumerate(sorted(seen))}  # single characters: never a special
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    _add_specials(tok, _DEFAULT_SPECIALS)
    return TextTokenizer(tok, _DEFAULT_SPECIALS, {"kind": "char", "source": "corpus"})


def _bpe(texts: Iterable[str], vocab_size: int | None) -> TextTokenizer:
    min_size = 256 + len(_ROLES) + 1
    if vocab_size is None or vocab_size < min_size:
        raise ValueError(
            f"tokenizer kind 'bpe' needs vocab_size >= {min_size} (256 bytes + specials), "
            f"got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_DEFAULT_SPECIALS[r] for r in _ROLES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)  # streams: word counts, not the corpus
    return TextTokenizer(tok, _DEFAULT_SPECIALS, {"kind": "bpe", "source": "corpus"})
