"""Weights of released MDLM-lineage checkpoints, renamed for `MDLMDiT` (models/mdlm_dit.py).

Two upstream file formats hold the same DDiT under `backbone.*`:

  - a Lightning `.ckpt` of the official MDLM / UDLM / Duo / XDLM code: `state_dict` (the raw
    weights, keys `backbone.<name>`) and `ema` = {decay, num_updates, shadow_params}, where
    `shadow_params` is a LIST in the order of `backbone.parameters()` (the buffers, here only
    `rotary_emb.inv_freq`, are not in it); read with `safe_pickle.safe_load`;
  - a Hugging Face custom-code repo (e.g. kuleshov-group/mdlm-owt): `config.json` (read as JSON;
    its `modeling_*.py` is never run) and `model.safetensors` or `pytorch_model.bin` with the
    same `backbone.<name>` keys (the released weights; no separate EMA). A "flat" file holding
    the backbone's own keys without the prefix is accepted too.

Upstream name (after `backbone.`)         ->  MDLMDiT name
  vocab_embed.embedding                        embed.weight
  sigma_map.mlp.0.{weight,bias}                time_in.{weight,bias}
  sigma_map.mlp.2.{weight,bias}                time_out.{weight,bias}
  blocks.i.norm1.weight / norm2.weight         blocks.i.norm1.weight / norm2.weight
  blocks.i.attn_qkv.weight                     blocks.i.qkv.weight
  blocks.i.attn_out.weight                     blocks.i.attn_out.weight
  blocks.i.mlp.0.* / mlp.2.*                   blocks.i.mlp_in.* / mlp_out.*
  blocks.i.adaLN_modulation.*                  blocks.i.modulation.*
  output_layer.norm_final.weight               final_norm.weight
  output_layer.linear.*                        output_head.*
  output_layer.adaLN_modulation.*              final_modulation.*
  rotary_emb.inv_freq                          (recomputed; checked to be base 10,000)
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from xdlm.files import read_json
from xdlm.models.safe_pickle import plain, safe_load

_RULES = [
    (r"vocab_embed\.embedding", "embed.weight"),
    (r"sigma_map\.mlp\.0\.(weight|bias)", r"time_in.\1"),
    (r"sigma_map\.mlp\.2\.(weight|bias)", r"time_out.\1"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.weight", r"blocks.\1.\2.weight"),
    (r"blocks\.(\d+)\.attn_qkv\.weight", r"blocks.\1.qkv.weight"),
    (r"blocks\.(\d+)\.attn_out\.weight", r"blocks.\1.attn_out.weight"),
    (r"blocks\.(\d+)\.mlp\.0\.(weight|bias)", r"blocks.\1.mlp_in.\2"),
    (r"blocks\.(\d+)\.mlp\.2\.(weight|bias)", r"blocks.\1.mlp_out.\2"),
    (r"blocks\.(\d+)\.adaLN_modulation\.(weight|bias)", r"blocks.\1.modulation.\2"),
    (r"output_layer\.norm_final\.weight", "final_norm.weight"),
    (r"output_layer\.linear\.(weight|bias)", r"output_head.\1"),
    (r"output_layer\.adaLN_modulation\.(weight|bias)", r"final_modulation.\1"),
]
_BUFFERS = ("rotary_emb.inv_freq",)
PREFIX = "backbone."


@dataclass
class UpstreamWeights:
    """Backbone weights renamed for MDLMDiT, the EMA average when the file has one, and what the
    file says about the model (`hints`: config.json of a HF repo, or `lightning_hints` of a
    .ckpt's saved config; keys n_heads, model_length, time_conditioning, model_type, ...)."""

    weights: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    ema_meta: dict = field(default_factory=dict)
    hints: dict = field(default_factory=dict)
    step: int = 0
    source_format: str = ""


def native_name(upstream: str) -> str:
    """MDLMDiT parameter name of an upstream backbone name (without `backbone.`)."""
    for pattern, repl in _RULES:
        if re.fullmatch(pattern, upstream):
            return re.sub(pattern, repl, upstream)
    raise ValueError(
        f"unknown upstream backbone key {upstream!r}: not an MDLM-lineage DDiT (class-conditional "
        "UDLM `cond_map`, DiMamba and autoregressive backbones are not supported)"
    )


def backbone_tensors(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The `backbone.*` entries (in file order) without the prefix; `_orig_mod.` (a compiled
    backbone) is stripped too. Other entries (noise schedule, ...) are left out. A "flat" file
    (the backbone's own state_dict, no `backbone.` prefix, as some re-uploads store it) is
    taken as it is."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(PREFIX):
            out[key[len(PREFIX) :].removeprefix("_orig_mod.")] = value
    if not out and "vocab_embed.embedding" in state_dict:
        return dict(state_dict)
    if not out:
        raise ValueError(
            f"no '{PREFIX}*' weights in the checkpoint (keys start {sorted(state_dict)[:5]}); "
            "expected the state_dict of the official MDLM / UDLM / Duo / XDLM code"
        )
    return out


def rename(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Upstream backbone tensors -> MDLMDiT state dict (buffers checked and dropped)."""
    out = {}
    for key, value in tensors.items():
        if key in _BUFFERS:
            _check_inv_freq(value)
            continue
        out[native_name(key)] = value
    return out


def _check_inv_freq(inv_freq: Tensor) -> None:
    dim = 2 * inv_freq.numel()
    expected = 10_000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if not torch.allclose(inv_freq.double(), expected, rtol=1e-5):
        raise ValueError("rotary_emb.inv_freq is not the base-10,000 RoPE MDLMDiT reproduces")


def ema_by_name(upstream: dict[str, Tensor], shadow: list[Tensor]) -> dict[str, Tensor]:
    """Pair the EMA's `shadow_params` list with the backbone parameters in registration order.

    The list may continue past the backbone (e.g. a learnt noise schedule's parameters), which
    are dropped; shapes are checked one by one, so a wrong order cannot pass silently.
    """
    names = [k for k in upstream if k not in _BUFFERS]
    if len(shadow) < len(names):
        raise ValueError(
            f"the EMA holds {len(shadow)} tensors but the backbone has {len(names)} parameters"
        )
    out = {}
    for name, value in zip(names, shadow, strict=False):
        if tuple(value.shape) != tuple(upstream[name].shape):
            raise ValueError(
                f"EMA tensor for {name} has shape {tuple(value.shape)}, the weight "
                f"{tuple(upstream[name].shape)}: the EMA does not follow the backbone order"
            )
        out[native_name(name)] = value
    return out


def read_lightning(path: str | Path) -> UpstreamWeights:
    """A Lightning `.ckpt` (safe loading, see `safe_pickle`)."""
    data = safe_load(path)
    if "state_dict" not in data:
        raise ValueError(f"{path} has no 'state_dict'; keys are {sorted(data)[:10]}")
    upstream = backbone_tensors(data["state_dict"])
    ema, meta = None, {}
    if isinstance(data.get("ema"), dict) and data["ema"].get("shadow_params") is not None:
        ema = ema_by_name(upstream, list(data["ema"]["shadow_params"]))
        meta = {k: data["ema"].get(k) for k in ("decay", "num_updates")}
    step = data.get("global_step", 0)
    hparams = data.get("hyper_parameters")
    config = plain(hparams.get("config")) if isinstance(hparams, dict) else None
    return UpstreamWeights(
        rename(upstream), ema, meta, lightning_hints(config),
        int(step) if isinstance(step, int) else 0, "lightning",
    )  # fmt: skip


# The diffusion of a run as its saved config names it -> our `model_type` (k 0 or 1).
_ALGO_TYPES = {"mdlm": "mdlm", "udlm": "udlm", "absorbing_state": "mdlm", "uniform": "udlm"}


def lightning_hints(config) -> dict:
    """What the hydra config saved in a .ckpt says, in config.json's keys: n_heads and
    model_length (`model.*`), time_conditioning (`algo.*` in Duo / XDLM, top level in MDLM /
    UDLM), model_type (`algo.name`, else `diffusion`: mdlm / udlm only), `algo` (the name as
    saved, e.g. xdlm, for the error message), `k1` (XDLM's uniform share, `algo.k1`) and
    `change_of_variables` (`training.*`; MDLM / UDLM code only: their training conditions on
    the time t' of another schedule, `models.mdlm_dit.change_of_variables_time`. Duo / XDLM
    code, whose configs have an `algo` section, keeps the key in its config but never reads
    it). {} when there is no readable config."""
    if not isinstance(config, dict):
        return {}
    model, algo, training = (
        config.get(key) if isinstance(config.get(key), dict) else {}
        for key in ("model", "algo", "training")
    )
    name = algo.get("name") or config.get("diffusion")
    hints = {
        "n_heads": model.get("n_heads"),
        "model_length": model.get("length"),
        "time_conditioning": algo.get("time_conditioning", config.get("time_conditioning")),
        "model_type": _ALGO_TYPES.get(name),
        "algo": name,
        "k1": algo.get("k1"),
        "change_of_variables": None if algo else training.get("change_of_variables"),
    }
    return {k: v for k, v in hints.items() if v is not None}


def read_hf_dir(path: str | Path) -> UpstreamWeights:
    """A HF custom-code repo directory: config.json + model.safetensors / pytorch_model.bin."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a HF repo directory")
    config = read_json(config_file, "a model's config")
    if (path / "model.safetensors").is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path / "model.safetensors"))
        except SafetensorError as err:
            raise ValueError(
                f"{path / 'model.safetensors'} is truncated or corrupt ({err})"
            ) from None
    elif (path / "pytorch_model.bin").is_file():
        try:
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
            raise ValueError(
                f"{path / 'pytorch_model.bin'} is not a file of plain tensors (corrupt, or pickled "
                f"objects that could run code: {type(err).__name__}); refused, nothing in it ran"
            ) from None
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    return UpstreamWeights(rename(backbone_tensors(state)), None, {}, config, 0, "hf")
