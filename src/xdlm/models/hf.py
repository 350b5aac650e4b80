"""Hugging Face `transformers` backbones as diffusion denoisers: `HFDenoiser`.

    z_t (B, L) ids -> transformers model (bidirectional attention, key-padding mask)
                   -> final hidden states (B, L, D) -> output_head (the LM head Linear) -> (B, L, V)

Three kinds of backbone (`kind`, chosen once at construction):

- "remote": diffusion LLMs shipped with their own modeling code (LLaDA, Dream), loaded with
  `trust_remote_code=True`. They are bidirectional already; the 2D padding mask is passed as is.
  Dream was adapted from an autoregressive model and predicts token i from position i − 1: for
  `model_type == "Dream"` the logits (and hidden states) are shifted right by one position.
- "decoder": stock causal LMs (Llama, Qwen2, Mistral, ...) turned bidirectional for AR-to-diffusion
  adaptation. transformers 5.x builds its masks in `masking_utils.create_causal_mask`, which falls
  back to a bidirectional (padding-only) mask when `config.is_causal` is False; attention modules
  carry their own `is_causal` flag, used by SDPA when no mask is materialised, so it is cleared
  too. Verified by tests/test_models_hf.py (a later token changes earlier logits) for the "sdpa"
  and "eager" attention implementations.
- "encoder": masked LMs (BERT, ModernBERT, ...) via `AutoModelForMaskedLM`; bidirectional as is.

Time t is accepted and ignored (the paper's backbones have no time conditioning); `cond` must be
None. `hidden()` runs the full model with the output head bypassed, so `forward == output_head ∘
hidden` holds for any architecture whose logits are the head's output unchanged (a model with
logit soft-capping or scaling after the head would break it; none of the supported ones does).
"""

from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path

import torch
from torch import LongTensor, Tensor, nn

KINDS = ("auto", "decoder", "encoder", "remote")


@contextlib.contextmanager
def _named_errors(name_or_path):
    """What transformers raises for a malformed model directory (config.json not JSON or of
    wrong types, no or corrupt weights, a pickled `.bin` that `weights_only` refuses) -> one
    ValueError line naming the directory; a pickle is never run."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except pickle.UnpicklingError:
        raise ValueError(
            f"{name_or_path}: its pytorch_model.bin is not a file of plain tensors (corrupt, or "
            "pickled objects that could run code) and was refused by torch.load(weights_only="
            "True), nothing in it ran; use a safetensors checkpoint you trust"
        ) from None
    except (OSError, ValueError, TypeError, SafetensorError, StrictDataclassError) as err:
        reason = re.sub(r"\x1b\[[0-9;]*m|\s+", " ", str(err)).strip()[:300]
        raise ValueError(
            f"cannot load the Hugging Face model {name_or_path} ({type(err).__name__}: {reason})"
        ) from None


class HFDenoiser(nn.Module):
    """A `transformers` model behind the `Denoiser` / `HiddenDenoiser` protocols.

    Args:
        model: a `PreTrainedModel` with an LM head (`get_output_embeddings()` is an nn.Linear).
        kind: "decoder", "encoder" or "remote" (see module docstring); never "auto" here.

    Attributes:
        model: the wrapped model (its `save_pretrained` layout is the checkpoint format).
        output_head: the LM head Linear, weight (V, D).
        blocks: the nn.ModuleList of transformer layers (for FSDP wrapping and checkpointing).
        vocab_size: V, the number of output logits (mask id included).
    """

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        if kind not in KINDS[1:]:
            raise ValueError(f"HFDenoiser kind must be one of {KINDS[1:]}, got {kind!r}")
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"{type(model).__name__}.get_output_embeddings() is {type(head).__name__}, not an "
                "nn.Linear LM head; load a class with an LM head (…ForCausalLM/…ForMaskedLM)"
            )
        self.model, self.kind = model, kind
        self.shift_logits = getattr(model.config, "model_type", "") == "Dream"
        if kind == "decoder":
            _make_bidirectional(model)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        kind: str = "auto",
        torch_dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        vocab_size: int | None = None,
        **kwargs,
    ) -> HFDenoiser:
        """Load from a local directory or a hub name (users need internet for the latter).

        `kind="auto"` picks "remote" when the config maps to custom code (`auto_map`), else
        "encoder" for masked-LM architectures and "decoder" for causal LMs. `vocab_size` (e.g.
        a tokenizer with an added mask token) grows the embeddings via `resize_vocab`. Extra
        kwargs go to `from_pretrained` of the transformers Auto class.
        """
        from transformers import AutoConfig

        with _named_errors(name_or_path):
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        kind = resolve_kind(config, kind)
        if kind == "remote" and not trust_remote_code:
            raise ValueError(
                f"{name_or_path} needs its own modeling code; pass trust_remote_code=True "
                "(only for sources you trust)"
            )
        auto = _auto_class(config, kind)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        with _named_errors(name_or_path):
            model = auto.from_pretrained(
                name_or_path, config=config, dtype=torch_dtype,
                trust_remote_code=trust_remote_code, **kwargs,
            )  # fmt: skip
        denoiser = cls(model, kind)
        if vocab_size is not None:
            denoiser.resize_vocab(vocab_size)
        return denoiser

    @classmethod
    def from_config(cls, config, kind: str = "auto", trust_remote_code: bool = False) -> HFDenoiser:
        """A randomly initialised model from a `PretrainedConfig` (tests, from-scratch runs)."""
        kind = resolve_kind(config, kind)
        model = _auto_class(config, kind).from_config(config, trust_remote_code=trust_remote_code)
        return cls(model, kind)

    def save_pretrained(self, directory: str | Path, max_shard_size: str = "5GB") -> Path:
        """Write the HF layout (config.json + safetensors shards) loadable by `from_pretrained`."""
        directory = Path(directory)
        self.model.save_pretrained(
            directory, max_shard_size=max_shard_size, safe_serialization=True
        )
        return directory

    # ------------------------------------------------------------------ structure

    @property
    def output_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def vocab_size(self) -> int:
        return self.output_head.out_features

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer layers: the nn.ModuleList holding the most parameters."""
        lists = [m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if not lists:
            raise ValueError(f"{type(self.model).__name__} has no nn.ModuleList of layers")
        return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))

    def resize_vocab(self, n_tokens: int, pad_to_multiple_of: int | None = None) -> int:
        """Grow the input embeddings and LM head to hold `n_tokens` ids (never shrinks). Returns V.

        New rows are initialised by transformers (mean of the old embeddings).
        """
        if n_tokens > self.vocab_size:
            self.model.resize_token_embeddings(n_tokens, pad_to_multiple_of=pad_to_multiple_of)
        return self.vocab_size

    # ------------------------------------------------------------------ forward

    def hidden(
        self,
        z_t: LongTensor,
        t: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cond: LongTensor | None = None,
    ) -> Tensor:
        """Final hidden states (B, L, D) (after any head transform, e.g. BERT's); see `forward`."""
        with _bypassed(self.output_head):
            return self._run(z_t, attention_mask, cond)

    def forward(
        self,
        z_t: LongTensor,
        t: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cond: LongTensor | None = None,
    ) -> Tensor:
        """Logits (B, L, V) for noisy ids z_t (B, L).

        Args: z_t (B, L) ids; t (B,) or None, ignored; attention_mask (B, L) bool, True = real
        token (padded keys are never attended); cond must be None.
        """
        return self._run(z_t, attention_mask, cond)

    def _run(self, z_t: Tensor, attention_mask: Tensor | None, cond: Tensor | None) -> Tensor:
        if cond is not None:
            raise ValueError("HFDenoiser has no class conditioning; pass cond=None")
        if z_t.dim() != 2:
            raise ValueError(f"z_t must be (B, L) token ids, got shape {tuple(z_t.shape)}")
        mask = _padding_mask(attention_mask, z_t.shape)
        out = self.model(input_ids=z_t, attention_mask=mask, use_cache=False).logits
        if self.shift_logits:
            out = torch.cat([out[:, :1], out[:, :-1]], dim=1)
        return out


def resolve_kind(config, kind: str) -> str:
    """Resolve "auto" to "remote" (config has `auto_map`), "encoder" or "decoder"."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "auto_map", None):
        return "remote"
    archs = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith("ForCausalLM") for a in archs)
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not causal_arch:
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise ValueError(
        f"cannot tell the kind of model_type={config.model_type!r}; pass kind='decoder', "
        "'encoder' or 'remote'"
    )


def _auto_class(config, kind: str):
    """The transformers Auto class for a kind; remote models may register either head."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    if kind == "encoder":
        return AutoModelForMaskedLM
    if kind == "remote":
        auto_map = getattr(config, "auto_map", None) or {}
        for name, cls in (
            ("AutoModelForCausalLM", AutoModelForCausalLM),
            ("AutoModelForMaskedLM", AutoModelForMaskedLM),
        ):
            if name in auto_map:
                return cls
        return AutoModel
    return AutoModelForCausalLM


def _make_bidirectional(model: nn.Module) -> None:
    """Full (non-causal) attention for a transformers 5.x decoder (see module docstring)."""
    configs = [model.config] + [
        sub
        for key in getattr(model.config, "sub_configs", {})
        if (sub := getattr(model.config, key, None)) is not None
    ]
    for cfg in configs:
        cfg.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


def _padding_mask(attention_mask: Tensor | None, shape: torch.Size) -> Tensor | None:
    """(B, L) bool, True = real -> (B, L) long for transformers, or None.

    A row with no real token attends to everything instead (finite, meaningless outputs).
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.shape != shape:
        raise ValueError(
            f"attention_mask must be a bool tensor of shape {tuple(shape)} like z_t, got "
            f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
        )
    empty = ~attention_mask.any(dim=-1, keepdim=True)
    return (attention_mask | empty).long()


@contextlib.contextmanager
def _bypassed(head: nn.Module):
    """Make `head` the identity for the duration (module hooks, e.g. FSDP's, still run)."""
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


def _identity(x: Tensor) -> Tensor:
    return x
