"""The only module that turns configuration into objects: model, kernel, schedule, optimizer,
loss weighting, sampler. Every command builds through these functions; the sampling and loss
code below takes objects only (docs/training.md §4 lists the string choices still dispatched in
their own package: dist.strategy, the tokenizer kind, xdm's remasking).

`build_model` runs a model's own Python code only when `cfg.trust_remote_code` is set, and every
config read from a file reaches it through `grant_remote_code`, which sets that field to the
user's `--trust-remote-code` of this invocation (docs/security.md, "Trust comes from the command
line").
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from xdlm.config import (
    DataConfig,
    KernelConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    XDLMConfig,
)
from xdlm.core.kernel import MixedKernel
from xdlm.core.objective import Weighting
from xdlm.core.schedules import Schedule, make_schedule
from xdlm.data.corpora import embedded_corpus_path
from xdlm.data.manifest import Manifest, load_manifest
from xdlm.sampling import (
    XDM,
    Ancestral,
    AncestralFinal,
    Confidence,
    Dilated,
    Doubling,
    FinalStep,
    GreedyFinal,
    LogitFilter,
    PredictorCorrector,
    ReMDM,
    Sampler,
    Threshold,
    TimeGrid,
    UniformAlpha,
    UniformT,
)


def build_model(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """The denoiser: a native DiT preset (with overrides) or a wrapped transformers model."""
    if cfg.backbone == "dit":
        from xdlm.models.dit import DiT, DiTConfig

        overrides = {
            k: getattr(cfg, k)
            for k in ("n_layers", "d_model", "n_heads", "mlp_ratio")
            if getattr(cfg, k) is not None
        }
        return DiT(
            DiTConfig.from_preset(
                cfg.preset,
                vocab_size,
                dropout=cfg.dropout,
                time_conditioning=cfg.time_conditioning,
                num_classes=cfg.num_classes,
                tie_embeddings=cfg.tie_embeddings,
                grid_width=cfg.rope_grid_width,
                abs_positions=cfg.abs_positions,
                **overrides,
            )
        )
    if cfg.backbone == "mdlm-dit":
        return _mdlm_dit(cfg, vocab_size)
    if cfg.backbone == "hf":
        from xdlm.models.hf import HFDenoiser

        if not cfg.hf_name:
            raise ValueError("model.backbone=hf needs model.hf_name (a hub name or local path)")
        return HFDenoiser.from_pretrained(
            cfg.hf_name,
            kind=cfg.hf_kind,
            torch_dtype=cfg.hf_dtype,
            trust_remote_code=cfg.trust_remote_code,
            vocab_size=vocab_size,
        )
    raise ValueError(f"unknown model.backbone {cfg.backbone!r}; choose 'dit', 'mdlm-dit' or 'hf'")


TRUST_FLAG = "--trust-remote-code"


def grant_remote_code(cfg: XDLMConfig, trust_remote_code: bool, source: str | Path) -> XDLMConfig:
    """`cfg` with its model as this invocation may build it: `trust_remote_code` is the user's
    `--trust-remote-code` on this command line, never the value saved in `source` (the file
    `cfg` was read from: a run's meta.json / config.yaml, an export's config.json, a recipe).

    A model whose loading would run Python code of its own (an HF backbone that sets
    `trust_remote_code` or `hf_kind=remote`, or whose `hf_name` is a directory with `.py` files
    or an `auto_map`) is refused without the flag: ValueError naming `source` and the flag.
    `model.trust_remote_code` of the result is the user's choice (False for native backbones)."""
    model = cfg.model
    reason = _own_code(model) if model.backbone == "hf" else None
    if reason and not trust_remote_code:
        raise ValueError(
            f"{source}: {reason}, so loading it would run Python code from model.hf_name="
            f"{model.hf_name!r}; xdlm runs a model's own code only when you pass {TRUST_FLAG} "
            "on the command line (only for code you trust)"
        )
    granted = trust_remote_code and model.backbone == "hf"
    return dataclasses.replace(cfg, model=dataclasses.replace(model, trust_remote_code=granted))


def _own_code(cfg: ModelConfig) -> str | None:
    """Why building the HF backbone `cfg` would run code it ships, or None."""
    if cfg.trust_remote_code:
        return "it sets model.trust_remote_code=true"
    if cfg.hf_kind == "remote":
        return "it sets model.hf_kind=remote"
    directory = Path(cfg.hf_name or "")
    if not cfg.hf_name or not directory.is_dir():
        return None  # a Hub id: transformers runs no code of it without trust_remote_code
    code = sorted(p.name for p in directory.glob("*.py"))
    if code:
        return f"its model.hf_name directory holds Python files ({', '.join(code[:3])})"
    for name in ("config.json", "tokenizer_config.json"):
        try:
            mapped = "auto_map" in json.loads((directory / name).read_text())
        except (OSError, ValueError, TypeError):
            mapped = False
        if mapped:
            return f"its model.hf_name directory's {name} has an auto_map (code to import)"
    return None


def _mdlm_dit(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """The upstream MDLM-lineage DDiT; its sizes have no preset and must be given."""
    from xdlm.models.mdlm_dit import MDLMDiT, MDLMDiTConfig

    missing = [k for k in ("n_layers", "d_model", "n_heads") if getattr(cfg, k) is None]
    if missing:
        raise ValueError(f"model.backbone=mdlm-dit needs model.{', model.'.join(missing)}")
    ratio = cfg.mlp_ratio if cfg.mlp_ratio is not None else 4
    if ratio != int(ratio):
        raise ValueError(f"model.backbone=mdlm-dit needs an integer mlp_ratio, got {ratio}")
    return MDLMDiT(
        MDLMDiTConfig(
            vocab_size, cfg.n_layers, cfg.d_model, cfg.n_heads, cond_dim=cfg.cond_dim,
            mlp_ratio=int(ratio), dropout=cfg.dropout, time_input=cfg.time_input,
        )
    )  # fmt: skip


def output_size(model: torch.nn.Module) -> int:
    """V: the number of logits the denoiser outputs per position (its output head's rows)."""
    return int(model.output_head.weight.shape[0])


def build_kernel(
    cfg: KernelConfig, manifest: Manifest, vocab_size: int | None = None
) -> MixedKernel:
    """MixedKernel over V = `vocab_size` (default: the dataset's), mask id from the manifest."""
    V = vocab_size or manifest.vocab_size
    if V < manifest.vocab_size:
        raise ValueError(
            f"the model outputs {V} logits but the data has vocab_size="
            f"{manifest.vocab_size}; build the model for the data's vocabulary"
        )
    if not cfg.use_mask:
        if cfg.k != 1.0:
            raise ValueError(f"kernel.use_mask=false needs kernel.k=1 (pure UDLM), got k={cfg.k}")
        return MixedKernel.udlm(V)
    return MixedKernel(V, manifest.mask_id, float(cfg.k))


def build_schedule(cfg: KernelConfig) -> Schedule:
    kwargs = {"eps": cfg.eps} if cfg.schedule != "linear" else {}
    if cfg.schedule == "polynomial":
        kwargs["power"] = cfg.power
    return make_schedule(cfg.schedule, **kwargs)


def build_weighting(cfg: TrainConfig) -> Weighting:
    """`train.weighting` (elbo | unit) as the loss's `Weighting`; other values are errors."""
    try:
        return Weighting(cfg.weighting)
    except ValueError:
        raise ValueError(
            f"unknown train.weighting {cfg.weighting!r}; choose one of "
            f"{[w.value for w in Weighting]}"
        ) from None


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (parameters with < 2 dims)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to `lr`, then constant or cosine decay to `min_lr_ratio·lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        scale = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.lr * scale
    raise ValueError(f"unknown train.lr_schedule {cfg.lr_schedule!r}; choose constant or cosine")


def resolve_sources(sources: list[str]) -> list[str]:
    """`embedded:NAME` -> the corpus shipped in the package; other entries unchanged."""
    return [
        str(embedded_corpus_path(s.split(":", 1)[1])) if s.startswith("embedded:") else s
        for s in sources
    ]


def ensure_dataset(cfg: DataConfig) -> Manifest:
    """The manifest of `cfg.path`, preparing the dataset first when it is absent and
    `cfg.sources` says what to prepare it from."""
    path = Path(cfg.path)
    if not cfg.path:
        raise ValueError(
            "data.path is empty; set it to a prepared dataset (xdlm prepare) "
            "or to where data.sources should be prepared"
        )
    if not (path / "manifest.json").is_file() and cfg.sources:
        from xdlm.data.prepare import prepare

        try:  # a trainer preparing the same path first: wait for it, then use its result
            prepare(
                resolve_sources(cfg.sources),
                path,
                tokenizer=cfg.tokenizer,
                tokenizer_source=cfg.tokenizer_source,
                tokenizer_vocab_size=cfg.tokenizer_vocab_size,
                seq_len=cfg.seq_len,
                mode=cfg.mode,
                valid_fraction=cfg.valid_fraction,
                wait=True,
            )
        except FileExistsError:
            if not (path / "manifest.json").is_file():
                raise
    return load_manifest(path)


SAMPLERS = {
    "ancestral": Ancestral,
    "remdm": ReMDM,
    "confidence": Confidence,
    "xdm": XDM,
    "pc": PredictorCorrector,
    "threshold": Threshold,
    "dilated": Dilated,
}
FINAL_STEPS = {"ancestral": AncestralFinal, "greedy": GreedyFinal, "none": None}
GRIDS = {"t": UniformT, "alpha": UniformAlpha, "doubling": Doubling}
REMDM_STRATEGIES = {"cap": False, "rescale": True}  # ReMDM(rescale=...)


@dataclass(frozen=True)
class SamplingPlan:
    """The objects `xdlm.sampling.generate` takes, built from `SampleConfig` once."""

    sampler: Sampler
    final: FinalStep | None
    grid: TimeGrid
    filter: LogitFilter

    def generate_kwargs(self) -> dict:
        """sampler, final, grid and filter as keywords of `generate`."""
        return {"sampler": self.sampler, "final": self.final, "grid": self.grid,
                "filter": self.filter}  # fmt: skip


def _pick(table: dict, value: str, key: str):
    if value not in table:
        raise ValueError(f"unknown {key} {value!r}; choose one of {sorted(table)}")
    return table[value]


def resolve_sampling(cfg: SampleConfig, model: ModelConfig, mask_id: int | None) -> SampleConfig:
    """The run-dependent defaults filled in: `sampler` unset -> `xdm` for HF (LLaDA-style) runs
    with a mask state, `ancestral` otherwise; `temperature` unset -> 0 for xdm, else 1."""
    sampler = cfg.sampler
    if sampler is None:
        sampler = "xdm" if model.backbone == "hf" and mask_id is not None else "ancestral"
    if sampler == "xdm" and model.time_conditioning:
        raise ValueError("the xdm sampler calls the model without t; pick --sampler ancestral")
    temperature = cfg.temperature
    if temperature is None:
        temperature = 0.0 if sampler == "xdm" else 1.0
    return dataclasses.replace(cfg, sampler=sampler, temperature=temperature)


def build_sampler(cfg: SampleConfig) -> SamplingPlan:
    """`sample.sampler`, `final`, `grid` (+ `t_end`), the ReMDM / xdm settings and the logit
    filter (`temperature`, `top_k`, `top_p`) as objects; unknown names are errors. An unset
    sampler is `ancestral` here (`resolve_sampling` picks xdm for HF runs first)."""
    cfg = resolve_sampling(cfg, ModelConfig(), 0) if cfg.sampler is None else cfg
    kind = _pick(SAMPLERS, cfg.sampler, "sample.sampler")
    temperature = cfg.temperature
    if temperature is None:
        temperature = 0.0 if kind is XDM else 1.0
    filt = LogitFilter(temperature, cfg.top_k, cfg.top_p)
    if kind is XDM:
        if cfg.top_k is not None or cfg.top_p is not None:
            raise ValueError(
                "--top-k/--top-p (sample.top_k/top_p) do not apply to the xdm sampler "
                "(greedy or --temperature)"
            )
        sampler = XDM(
            temperature, cfg.xdm_remasking, protect_prompt=cfg.xdm_protect_prompt,
            rank_dtype=cfg.xdm_rank_dtype,
        )  # fmt: skip
        filt = LogitFilter()  # xdm draws x̂ itself (its own temperature)
    elif kind is ReMDM:
        rescale = _pick(REMDM_STRATEGIES, cfg.remdm_strategy, "sample.remdm_strategy")
        sampler = ReMDM(eta=cfg.remdm_eta, rescale=rescale)
    elif kind is PredictorCorrector:
        sampler = PredictorCorrector(eta=cfg.pc_eta)
    elif kind is Threshold:
        sampler = Threshold(cfg.threshold, cfg.threshold_revise, cfg.threshold_remask)
    elif kind is Dilated:
        sampler = Dilated(uniform_reveal=cfg.dilated_uniform_reveal)
    else:
        sampler = kind()
    final = _pick(FINAL_STEPS, cfg.final, "sample.final")
    grid = _pick(GRIDS, cfg.grid, "sample.grid")(t_end=cfg.t_end)
    return SamplingPlan(sampler, final() if final is not None else None, grid, filt)


def build_device(name: str) -> str:
    """`auto` -> "cuda" when a GPU is visible, else "cpu"; any other name checked against this
    machine: an unknown name or a device this torch cannot reach (`cuda` on a CPU-only build,
    `cuda:3` with 2 GPUs, `mps` off Apple silicon) is a ValueError naming the fix."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {name!r} requested but this torch sees no CUDA GPU (CUDA build: "
                f"{torch.version.cuda or 'none, CPU-only'}); use --device cpu or auto"
            )
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {name!r} requested but only {count} CUDA GPU(s) are visible "
                f"(cuda:0..cuda:{count - 1}); use --device cuda or auto"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available; use auto or cpu")
    return name
