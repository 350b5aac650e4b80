"""The configuration schema: typed dataclasses. YAML files hold overrides only; `--set a.b=c`.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=100", "kernel.k=0"])

Every command reads this one schema (docs/training.md, "Configuration"): `train` the whole of
it; `sample`, `eval` and `images` start from the run's saved config, less the settings that
belong to the invocation, and may change only the `sample`, `eval` and `images` sections
(`xdlm.invocation.inference_config`). Unknown keys, wrongly typed
values, values outside a `Literal` and values out of range (`validate`) raise `ValueError`
naming the key, the value and the valid choices or range. `k` is one setting (`kernel.k`), so
MDLM (0), XDLM (0.1) and UDLM (1) share recipes.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from xdlm.files import parse_yaml, read_yaml

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """The denoiser. `backbone="dit"` uses the native DiT preset (+ overrides);
    `backbone="mdlm-dit"` the upstream MDLM-lineage DDiT (models/mdlm_dit.py; n_layers, d_model,
    n_heads required, `cond_dim`, `time_input`), as `xdlm import` writes it;
    `backbone="hf"` wraps a transformers model (`hf_name`, `hf_kind`)."""

    backbone: Literal["dit", "mdlm-dit", "hf"] = "dit"
    preset: str = "tiny"
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    mlp_ratio: float | None = None
    dropout: float = 0.0
    time_conditioning: bool = False
    num_classes: int = 0
    tie_embeddings: bool = False
    rope_grid_width: int = 0  # dit only: > 0 = 2-D rotary positions of a W-wide image (images)
    abs_positions: bool = False  # dit only: learned absolute positions (images: where a pixel is)
    cond_dim: int = 128  # mdlm-dit only
    time_input: Literal["none", "sigma", "t"] = "none"  # mdlm-dit only (models/mdlm_dit.py)
    hf_name: str | None = None
    hf_kind: str = "auto"
    hf_dtype: str | None = None
    trust_remote_code: bool = False


@dataclass
class KernelConfig:
    """The XDLM kernel (uniform share k) and the noise schedule α_t."""

    k: float = 0.1
    use_mask: bool = True  # False (only with k = 1): pure UDLM with no mask state
    schedule: Literal["loglinear", "linear", "cosine", "polynomial"] = "loglinear"
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
    mode: Literal["wrap", "pad"] = "wrap"
    valid_fraction: float = 0.05
    batch_size: int = 32  # per process, per micro-batch


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "constant"  # both after linear warmup
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.9999
    precision: Precision = "auto"  # auto: bf16 only where measured faster (xdlm.precision)
    compile: bool = False
    t_min: float = 1e-3
    antithetic: bool = True
    weighting: Literal["elbo", "unit"] = "elbo"  # elbo: −α' weight; unit: the LLM-scale variant
    fused_loss: bool = False
    seed: int = 0
    device: str = "auto"
    log_every: int = 20
    eval_every: int = 500
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 2
    max_nan_steps: int = 0  # non-finite steps skipped before stopping (0: stop at the first)
    tensorboard: bool = False  # scalars to RUN/tensorboard/ (xdlm.train.trackers)
    wandb: bool = False  # Weights & Biases, files in RUN/wandb/
    wandb_project: str = "xdlm"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    cond_drop: float = 0.1  # share of labelled rows trained with the null class (CFG)


@dataclass
class DistConfig:
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    activation_checkpointing: bool = False
    mixed_precision: bool = False  # FSDP2 bf16 params/reduce
    cpu_offload: bool = False


@dataclass
class SampleConfig:
    """Sampling: `xdlm sample`, the samples printed after `xdlm train`, `xdlm images`, and the
    sampler of `xdlm eval --gen-ppl` (whose sweep sets steps / temperature / top-p itself)."""

    num_samples: int = 4
    steps: int = 32  # T reverse steps (per semi-AR block)
    seq_len: int | None = None  # default: data.seq_len of the run
    # None: xdm for HF (LLaDA-style) runs, ancestral otherwise (`builders.resolve_sampling`)
    sampler: (
        Literal["ancestral", "remdm", "confidence", "xdm", "pc", "threshold", "dilated"] | None
    ) = None
    final: Literal["ancestral", "greedy", "none"] = "ancestral"  # the noise-removal step
    grid: Literal["t", "alpha", "doubling"] = "t"  # uniform in t (the paper), in α_t, α doubling
    t_end: float = 1e-5  # the last grid time before the final step
    temperature: float | None = None  # None: 0 (greedy) for xdm, 1 otherwise
    top_k: int | None = None
    top_p: float | None = None
    remdm_eta: float = 0.01  # ReMDM remasking (sampler=remdm, k = 0 runs)
    remdm_strategy: Literal["cap", "rescale"] = "cap"
    pc_eta: float = 0.5  # pc: corrector re-noising level as a share of the step, in (0, 1]
    threshold: float = 0.9  # threshold: reveal every masked token with p_θ(x̃) >= this
    threshold_revise: float = 0.5  # threshold (k > 0): revise with margin >= this
    threshold_remask: float = 0.0  # threshold (k > 0): re-mask visible tokens below (0 = off)
    dilated_uniform_reveal: bool = False  # dilated: reveals may take the uniform route too
    xdm_remasking: Literal["low_confidence", "random"] = "low_confidence"  # xdm reveal order
    xdm_protect_prompt: bool = False  # xdm: never edit the prompt / fixed tokens
    # xdm ranking: "logits" = the authors' (softmax in the logits' dtype, torch.topk ties),
    # "float64" = float64 p_θ, ties by position (docs/sampling.md)
    xdm_rank_dtype: Literal["logits", "float64"] = "logits"
    prompt: str | None = None  # fixed text prefix
    infill: str | None = None  # text with [BLANK] / [BLANK:n] gaps
    blank_len: int = 8  # tokens per plain [BLANK]
    block_size: int | None = None  # semi-autoregressive blocks
    class_label: int | None = None  # class-conditional models
    guidance: float = 0.0  # classifier-free guidance scale w (0 = unguided)
    seed: int = 0
    batch_size: int | None = None  # default: min(num_samples, 64) (xdlm sample)
    use_ema: bool = True
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps ...
    precision: Precision = "auto"


@dataclass
class EvalConfig:
    """`xdlm eval`: likelihood bounds, zero-shot likelihood and generation quality
    (docs/evaluation.md); gen-PPL samples with the `sample` section's sampler, final and grid."""

    data: str | None = None  # prepared dataset for the likelihood bound
    split: str = "valid"
    t_samples: int = 4  # t nodes per sequence
    quadrature: Literal["midpoint", "gauss-legendre"] | None = None  # None: stratified t
    discrete_T: list[int] = field(default_factory=list)  # also the T-step discrete bounds
    max_batches: int | None = None
    zero_shot: list[str] = field(default_factory=list)  # files or hf:NAME corpora
    mode: Literal["wrap", "pad"] = "wrap"  # zero-shot chunking
    seq_len: int | None = None  # zero-shot length; default data.seq_len of the run
    max_tokens: int | None = None  # per zero-shot corpus
    gen_ppl: bool = False
    scorer: str = "smollm2"  # 'smollm2', a HF name or a local dir
    steps: list[int] = field(default_factory=lambda: [8, 32])
    temperature: list[float] = field(default_factory=lambda: [1.0])
    top_p: list[float] = field(default_factory=lambda: [1.0])  # 1.0 = off
    num_samples: int = 16
    sample_len: int | None = None  # default: data.seq_len of the run
    plot: str | None = None  # PNG of gen-PPL vs entropy
    batch_size: int = 16
    seed: int = 0
    use_ema: bool = True
    device: str = "auto"
    precision: Precision = "auto"


@dataclass
class ImagesConfig:
    """`xdlm images sample | eval` (sampling settings come from `sample`: steps, guidance, ...)."""

    per_class: int = 8
    inception: Literal["torch-fidelity", "pytorch-fid"] | None = None


@dataclass
class XDLMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> XDLMConfig:
    """Defaults, then the YAML file's overrides, then `a.b=c` strings (values parsed as YAML);
    then `validate`."""
    return validate(apply_overrides(apply_file(XDLMConfig(), path), overrides))


def apply_file(cfg: XDLMConfig, path: str | Path | None, sections=None) -> XDLMConfig:
    """`cfg` with the YAML file at `path` merged in (unchanged if `path` is None); `sections`
    (names) limits which top-level sections the file may set."""
    if path is None:
        return cfg
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; see configs/ for recipes")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    for section in data:
        check_section(section, sections, f"{path}: section")
    return merge(cfg, data)


def apply_overrides(cfg: XDLMConfig, overrides: list[str] | None, sections=None) -> XDLMConfig:
    """`cfg` with `--set` strings `a.b=c` applied in order (values parsed as YAML)."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE (e.g. train.steps=100), got {item!r}")
        keys = key.strip().split(".")
        check_section(keys[0], sections, "--set")
        cfg = merge(cfg, _nest(keys, parse_yaml(value, f"--set {item!r}")))
    return cfg


def choices(cls, name: str) -> list:
    """The allowed values of a `Literal` field, e.g. `choices(SampleConfig, "sampler")`."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return list(typing.get_args(args[0])) if typing.get_origin(args[0]) is Literal else list(args)


def check_section(name: str, sections, where: str) -> None:
    """ValueError when section `name` is not among `sections` (None: every section)."""
    if sections is not None and name not in sections:
        raise ValueError(
            f"{where} {name!r} cannot be changed here: the run's model, kernel and data are "
            f"fixed by its checkpoint; this command reads only {list(sections)}"
        )


def config_changes(old: XDLMConfig, new: XDLMConfig) -> dict[str, tuple]:
    """{"section.key": (old value, new value)} for every setting that differs."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# (key, lowest allowed value, what it means): integers that must be at least that value.
_AT_LEAST = (
    ("train.steps", 1, "optimizer steps to train"),
    ("train.warmup_steps", 0, "linear warmup steps (0 = none)"),
    ("train.grad_accum", 1, "micro-batches per optimizer step"),
    ("train.log_every", 1, "steps between metrics lines"),
    ("train.eval_every", 1, "steps between validations"),
    ("train.save_every", 1, "steps between checkpoints"),
    ("train.keep_last", 1, "checkpoints kept"),
    ("train.eval_batches", 0, "validation batches (0 = no validation)"),
    ("train.max_nan_steps", 0, "non-finite steps tolerated"),
    ("data.batch_size", 1, "rows per micro-batch and process"),
    ("data.seq_len", 2, "tokens per row (room for BOS and EOS)"),
    ("sample.num_samples", 0, "samples (0: none printed after training)"),
    ("sample.steps", 1, "reverse steps"),
    ("sample.seq_len", 1, "tokens per sample"),
    ("sample.batch_size", 1, "samples per batch"),
    ("sample.block_size", 1, "tokens per semi-AR block"),
    ("sample.blank_len", 1, "tokens per [BLANK]"),
    ("sample.top_k", 1, "most likely tokens kept"),
    ("eval.t_samples", 1, "t nodes per sequence"),
    ("eval.max_batches", 1, "batches evaluated"),
    ("eval.seq_len", 2, "zero-shot row length"),
    ("eval.max_tokens", 1, "tokens per zero-shot corpus"),
    ("eval.num_samples", 1, "gen-PPL samples"),
    ("eval.sample_len", 1, "gen-PPL sample length"),
    ("eval.batch_size", 1, "rows per batch"),
    ("images.per_class", 1, "images per class"),
)
# (key, low, high, low inclusive, high inclusive)
_IN_RANGE = (
    ("kernel.k", 0.0, 1.0, True, True),
    ("train.lr", 0.0, math.inf, False, False),
    ("train.ema_decay", 0.0, 1.0, True, False),
    ("train.t_min", 0.0, 1.0, True, False),
    ("train.cond_drop", 0.0, 1.0, True, True),
    ("train.min_lr_ratio", 0.0, 1.0, True, True),
    ("train.grad_clip", 0.0, math.inf, False, True),
    ("data.valid_fraction", 0.0, 1.0, True, False),
    ("sample.temperature", 0.0, math.inf, True, False),
    ("sample.top_p", 0.0, 1.0, False, True),
    ("sample.t_end", 0.0, 1.0, False, False),
    ("eval.temperature", 0.0, math.inf, True, False),  # lists: every element
    ("eval.top_p", 0.0, 1.0, False, True),
    ("kernel.eps", 0.0, 1.0, False, False),
    ("kernel.power", 0.0, math.inf, False, False),
    ("train.weight_decay", 0.0, math.inf, True, False),
    ("train.beta1", 0.0, 1.0, True, False),
    ("train.beta2", 0.0, 1.0, True, False),
    ("model.dropout", 0.0, 1.0, True, False),
    ("model.mlp_ratio", 0.0, math.inf, False, False),
)


_INF_ALLOWED = ("train.grad_clip",)  # inf = no clipping


def validate(cfg: XDLMConfig) -> XDLMConfig:
    """Values the loop would divide by, loop over or feed to the math: ValueError naming the
    key, the value and the allowed range (instead of a ZeroDivisionError, NaN weights or a silent
    no-op); no float anywhere may be NaN or infinite (except `_INF_ALLOWED`). Optional keys
    (None = the documented default) are checked only when set."""
    for key, low, meaning in _AT_LEAST:
        value = _get(cfg, key)
        if value is not None and value < low:
            raise ValueError(
                f"{key} must be an integer >= {low} ({meaning}), got {value}; "
                f"e.g. --set {key}={max(low, _get(XDLMConfig(), key) or low)}"
            )
    for key, low, high, low_in, high_in in _IN_RANGE:
        value = _get(cfg, key)
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            ok = (v >= low if low_in else v > low) and (v <= high if high_in else v < high)
            if not ok or math.isnan(v):
                span = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
                raise ValueError(f"{key} must be in {span}, got {v}")
    for key, value in _flatten(cfg.to_dict()).items():  # NaN / inf anywhere else
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v) and key not in _INF_ALLOWED:
                raise ValueError(f"{key} must be a finite number, got {v}")
    return cfg


def _get(cfg: XDLMConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


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
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(
                f"config key {key!r} must be one of {list(typing.get_args(hint))}, got {value!r}"
            )
        return value
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
