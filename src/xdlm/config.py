"""The configuration schema: typed dataclasses. YAML files hold overrides only; `--set a.b=c`.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=100", "kernel.k=0"])

Unknown keys and wrongly typed values raise `ValueError` naming the key, the value and the
valid keys. `k` is one setting (`kernel.k`), so MDLM (0), XDLM (0.1) and UDLM (1) share recipes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class ModelConfig:
    """The denoiser. `backbone="dit"` uses the native DiT preset (+ overrides);
    `backbone="hf"` wraps a transformers model (`hf_name`, `hf_kind`)."""

    backbone: str = "dit"
    preset: str = "tiny"
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    mlp_ratio: float | None = None
    dropout: float = 0.0
    time_conditioning: bool = False
    num_classes: int = 0
    tie_embeddings: bool = False
    hf_name: str | None = None
    hf_kind: str = "auto"
    hf_dtype: str | None = None
    trust_remote_code: bool = False


@dataclass
class KernelConfig:
    """The XDLM kernel (uniform share k) and the noise schedule α_t."""

    k: float = 0.1
    use_mask: bool = True  # False (only with k = 1): pure UDLM with no mask state
    schedule: str = "loglinear"
    eps: float = 1e-3
    power: float = 2.0  # polynomial schedule only


@dataclass
class DataConfig:
    """A prepared dataset (`xdlm prepare`); prepared on first use when `sources` is set."""

    path: str = ""
    sources: list[str] = field(default_factory=list)  # files, "hf:NAME", or "embedded:austen"
    tokenizer: str = "bpe"
    tokenizer_source: str | None = None
    tokenizer_vocab_size: int | None = 2048
    seq_len: int = 128
    mode: str = "wrap"
    valid_fraction: float = 0.05
    batch_size: int = 32  # per process, per micro-batch


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant | cosine (both after linear warmup)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.9999
    precision: str = "auto"  # auto (bf16 only where measured faster) | fp32 | bf16 | fp16
    compile: bool = False
    t_min: float = 1e-3
    antithetic: bool = True
    weighting: str = "elbo"  # elbo (−α' weight) | unit (the LLM-scale variant)
    fused_loss: bool = False
    seed: int = 0
    device: str = "auto"
    log_every: int = 20
    eval_every: int = 500
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 2
    max_nan_steps: int = 10
    tensorboard: bool = False
    cond_drop: float = 0.1  # share of labelled rows trained with the null class (CFG)


@dataclass
class DistConfig:
    strategy: str = "none"  # none | ddp | fsdp
    activation_checkpointing: bool = False
    mixed_precision: bool = False  # FSDP2 bf16 params/reduce
    cpu_offload: bool = False


@dataclass
class SampleConfig:
    """Samples printed at the end of `xdlm train`."""

    num_samples: int = 4
    steps: int = 32


@dataclass
class XDLMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> XDLMConfig:
    """Defaults, then the YAML file's overrides, then `a.b=c` strings (values parsed as YAML)."""
    cfg = XDLMConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist; see configs/ for recipes")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
        cfg = merge(cfg, data)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE (e.g. train.steps=100), got {item!r}")
        cfg = merge(cfg, _nest(key.strip().split("."), yaml.safe_load(value)))
    return cfg


def config_from_dict(data: dict) -> XDLMConfig:
    """Rebuild a config saved with `to_dict()` (e.g. from a checkpoint)."""
    return merge(XDLMConfig(), data)


def merge(obj, data: dict, prefix: str = ""):
    """A copy of dataclass `obj` with `data` (nested dict) applied, type-checked."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown config key {full!r}; valid keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, full + ".")
        else:
            changes[key] = _coerce(value, hints[key], full)
    return dataclasses.replace(obj, **changes)


def _coerce(value, hint, key: str):
    """Check `value` against the annotation `hint` (int, float, bool, str, list[str], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, typing.get_args(hint)[0], key) for v in value]
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"config key {key!r} expects {hint.__name__}, got {value!r}")
    return value


def _nest(keys: list[str], value) -> dict:
    out = value
    for key in reversed(keys):
        out = {key: out}
    return out


def save_config(cfg: XDLMConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
