"""Tokenizer preparation, chat prompts and the SFT batch format for Hugging Face backbones.

SFT for a diffusion LM (LLaDA recipe): a sequence is prompt ‖ response ‖ EOS padding. The
prompt is never noised (`keep_mask`) and only the response counts in the loss (`loss_mask`); the
EOS padding is part of the response, so the model learns where to stop. Feed both masks to
`xdlm.core.objective.diffusion_loss(..., keep_mask=..., loss_mask=...)`.

Tokenizers are HF `PreTrainedTokenizerBase` objects (AutoTokenizer).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_MASK_TOKEN = "<|mdm_mask|>"  # LLaDA's mask token (id 126336 in its vocabulary)


@dataclass(frozen=True)
class SpecialIds:
    """Ids a diffusion LM needs; `mask` differs from every other one. `bos` may be None."""

    mask: int
    pad: int
    bos: int | None
    eos: int


def prepare_tokenizer(tokenizer, mask_token: str = DEFAULT_MASK_TOKEN) -> SpecialIds:
    """Give `tokenizer` a mask token (added when it has none) and return the special ids.

    The pad id falls back to EOS when the tokenizer has no pad token. After this, grow the model
    with `HFDenoiser.resize_vocab(len(tokenizer))`. Raises ValueError when the tokenizer has no
    EOS or when its mask coincides with another special token.
    """
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    eos = tokenizer.eos_token_id
    if eos is None:
        if tokenizer.sep_token_id is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has neither an EOS nor a SEP token; set "
                "tokenizer.eos_token before preparing it"
            )
        eos = tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    ids = SpecialIds(mask=tokenizer.mask_token_id, pad=pad, bos=bos, eos=eos)
    if ids.mask in (ids.pad, ids.bos, ids.eos):
        raise ValueError(f"the mask id must differ from pad/bos/eos, got {ids}; add a new token")
    return ids


def chat_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Prompt ids for a conversation `[{"role": ..., "content": ...}, ...]`.

    With a chat template: the template with the assistant turn opened (`add_generation_prompt`).
    Without one: the contents joined by newlines, preceded by BOS when the tokenizer has one.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    text = "\n".join(m["content"] for m in messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


@dataclass(frozen=True)
class SFTMasks:
    """keep_mask: prompt positions, never noised (B, L); loss_mask: response positions (B, L)."""

    keep_mask: Tensor
    loss_mask: Tensor


def sft_masks(
    tokens: Tensor, prompt_lengths: Tensor, attention_mask: Tensor | None = None
) -> SFTMasks:
    """Masks for a prompt/response batch tokens (B, L) with prompt_lengths (B,).

    keep_mask[b, i] = i < prompt_lengths[b]; loss_mask = real tokens that are not prompt.
    """
    if prompt_lengths.shape != (tokens.shape[0],):
        raise ValueError(
            f"prompt_lengths must have shape (B,)=({tokens.shape[0]},), "
            f"got {tuple(prompt_lengths.shape)}"
        )
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    keep = pos[None, :] < prompt_lengths.to(tokens.device)[:, None]
    loss = ~keep if attention_mask is None else attention_mask & ~keep
    return SFTMasks(keep_mask=keep, loss_mask=loss)


@dataclass(frozen=True)
class SFTBatch:
    """tokens (N, L), prompt_lengths (N,), attention_mask (N, L) bool (True = real)."""

    tokens: Tensor
    prompt_lengths: Tensor
    attention_mask: Tensor


def tokenize_sft_jsonl(
    path: str | Path,
    tokenizer,
    ids: SpecialIds,
    seq_len: int,
    pad_with_eos: bool = True,
) -> SFTBatch:
    """Read JSONL lines `{"prompt": str, "response": str}` (or `"messages"`: a chat whose last
    turn is the assistant's) and tokenise them into fixed-length rows.

    Row = chat_prompt(prompt) ‖ response ‖ EOS, then padding to `seq_len`: EOS tokens that are
    real and in the loss (`pad_with_eos`, LLaDA) or PAD tokens outside attention. Rows longer
    than seq_len are truncated from the right (the prompt is kept whole when it fits).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data {path} does not exist; give a JSONL file")
    rows, prompt_lens, lengths = [], [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "messages" in record:
            messages, response = record["messages"][:-1], record["messages"][-1]["content"]
        elif "prompt" in record and "response" in record:
            messages, response = [{"role": "user", "content": record["prompt"]}], record["response"]
        else:
            raise ValueError(f"{path}:{n} needs 'prompt' and 'response' or 'messages' keys")
        prompt = chat_prompt(tokenizer, messages)
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [ids.eos]
        row = (prompt + answer)[:seq_len]
        rows.append(row), prompt_lens.append(min(len(prompt), seq_len)), lengths.append(len(row))
    if not rows:
        raise ValueError(f"{path} holds no records")
    fill = ids.eos if pad_with_eos else ids.pad
    tokens = torch.tensor([r + [fill] * (seq_len - len(r)) for r in rows], dtype=torch.long)
    real = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]
    mask = torch.ones_like(real) if pad_with_eos else real
    return SFTBatch(tokens, torch.tensor(prompt_lens), mask)
