"""Convert a released MDLM-lineage checkpoint into an xdlm run (`xdlm import`).

    convert("mdlm.ckpt", ImportOptions(k=0.0))                            # Lightning .ckpt
    convert("kuleshov-group/mdlm-owt")                                     # Hub id or HF dir
    convert("Mzero17/XDLM", ImportOptions(file="PATH/last.ckpt", k=0.1))   # a .ckpt on the Hub

`xdlm.commands.import_.import_checkpoint(source, out, opts)` writes the result as a run
directory, the one `xdlm train` writes (checkpoints/step_N/ with model.safetensors,
ema.safetensors when the source has an EMA, meta.json with the kernel (V, mask id, k), the
log-linear schedule (ε = 1e-3, as upstream) and the config; tokenizer/), so `xdlm sample` and
`xdlm eval` load it like a trained run. Defaults, each overridable:

  - architecture: from the tensor shapes; n_heads from config.json (HF repos) or the hydra
    config saved in a .ckpt (read as data, `safe_pickle.plain`), else d_model / 64 (every
    upstream preset: tiny 512/8, small 768/12, medium 1024/16);
  - time input: "none" unless the source's config says `time_conditioning: true`; then
    "sigma", or "t" for an MDLM / UDLM run with `training.change_of_variables: true` (it was
    trained conditioned on the time of another schedule, models/mdlm_dit.py; read as σ its
    logits would be off);
  - tokenizer: V = 50,258 -> `gpt2-mdlm`, V = 30,522 -> `bert-base-uncased`;
  - k: `model_type` mdlm -> 0, udlm -> 1 (config.json, or the .ckpt config's algorithm);
    XDLM: its config's `algo.k1` (the uniform share k of its kernel, algo.py of MzeroMiko/XDLM);
    otherwise it must be given with --k.
    k = 1 gives the pure uniform kernel without a mask state (UDLM).

Nothing is executed from the source: a .ckpt goes through `models.safe_pickle.safe_load`,
config.json is read as JSON, weights as safetensors or a weights-only `torch.load`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from xdlm.config import DataConfig, KernelConfig, ModelConfig, XDLMConfig, validate
from xdlm.models.upstream import UpstreamWeights, read_hf_dir, read_lightning

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_TOKENIZER_BY_V = {50_258: "gpt2-mdlm", 30_522: "bert-base-uncased"}
_K_BY_MODEL_TYPE = {"mdlm": 0.0, "udlm": 1.0}
SIGMA_EPS = 1e-3  # upstream LogLinear noise ε


@dataclass(frozen=True)
class ImportOptions:
    """Settings a source file may not record; None = the default in the module docstring."""

    k: float | None = None
    n_heads: int | None = None
    time_input: str | None = None
    tokenizer: str | None = None
    tokenizer_source: str | None = None
    seq_len: int | None = None
    file: str | None = None
    revision: str | None = None


def read_source(
    source: str, file: str | None = None, revision: str | None = None
) -> UpstreamWeights:
    """UpstreamWeights from a .ckpt file, a HF repo dir, or a Hub id (downloaded)."""
    path = Path(source)
    if path.is_file():
        return read_lightning(path)
    if path.is_dir():
        if file is not None:
            return read_lightning(path / file)
        return read_hf_dir(path)
    if not _HUB_ID.fullmatch(source):
        raise FileNotFoundError(f"{source} is neither a file, a directory nor a Hub id owner/name")
    if file is not None:
        return read_lightning(_download(source, file, revision))
    return read_hf_dir(_download(source, None, revision))


def _download(repo: str, file: str | None, revision: str | None) -> Path:
    """One file (`file`) or the config + weights of a Hub repo; needs the internet."""
    import huggingface_hub as hub

    try:
        if file is not None:
            return Path(hub.hf_hub_download(repo, file, revision=revision))
        patterns = ["config.json", "model.safetensors", "pytorch_model.bin"]
        return Path(hub.snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as err:  # offline / missing repo / missing file: many types
        raise ValueError(
            f"could not download {repo}{' ' + file if file else ''} from the HF Hub ({err}); "
            "download it elsewhere and pass the local file or directory"
        ) from err


def model_config(w: UpstreamWeights, opts: ImportOptions) -> ModelConfig:
    """The mdlm-dit ModelConfig: sizes from the tensor shapes, the rest from the source's
    hints (config.json / the .ckpt's saved config), options first."""
    hints = w.hints
    d_model = _shape(w, "embed.weight")[1]
    n_layers = len({k.split(".")[1] for k in w.weights if k.startswith("blocks.")})
    n_heads = opts.n_heads or hints.get("n_heads") or d_model // 64
    time_input = opts.time_input or _time_input(hints)
    return ModelConfig(
        backbone="mdlm-dit", n_layers=n_layers, d_model=d_model, n_heads=int(n_heads),
        mlp_ratio=_shape(w, "blocks.0.mlp_in.weight")[0] / d_model,
        cond_dim=_shape(w, "time_in.weight")[0], time_input=time_input,
        time_conditioning=time_input != "none",
    )  # fmt: skip


def _shape(w: UpstreamWeights, name: str) -> tuple[int, ...]:
    """The shape of the source's tensor `name` (MDLMDiT naming); ValueError when it has none."""
    if name not in w.weights:
        raise ValueError(
            f"the source has no {name} tensor (it has {len(w.weights)} backbone tensors); the "
            "checkpoint is incomplete or not an MDLM-lineage DiT"
        )
    return tuple(int(n) for n in w.weights[name].shape)


def _time_input(hints: dict) -> str:
    """What the source's network was conditioned on (the module docstring)."""
    if not hints.get("time_conditioning"):
        return "none"
    return "t" if hints.get("change_of_variables") else "sigma"


def kernel_k(w: UpstreamWeights, opts: ImportOptions) -> float:
    """k: --k, else from the source's model type or XDLM config (`algo.k1`)."""
    if opts.k is not None:
        return float(opts.k)
    model_type = w.hints.get("model_type")
    if model_type in _K_BY_MODEL_TYPE:
        return _K_BY_MODEL_TYPE[model_type]
    k1 = w.hints.get("k1")
    if k1 is not None:
        if isinstance(k1, bool) or not isinstance(k1, (int, float)) or not 0 <= k1 <= 1:
            raise ValueError(f"the source's config has algo.k1={k1!r}, not a share in [0, 1]; "
                             "pass --k")  # fmt: skip
        return float(k1)
    algo = f" (its config names the algorithm {w.hints['algo']!r})" if "algo" in w.hints else ""
    raise ValueError(
        f"the source does not say which kernel it was trained with{algo}; pass --k "
        "(0 for MDLM, 1 for UDLM, the paper's 0.1 for XDLM)"
    )


def import_tokenizer(vocab_size: int, opts: ImportOptions):
    """The tokenizer of the source (see the module docstring), checked against V."""
    from xdlm.data.tokenizers import load_tokenizer

    kind = opts.tokenizer or _TOKENIZER_BY_V.get(vocab_size)
    if kind is None:
        raise ValueError(
            f"no default tokenizer for V = {vocab_size}; pass --tokenizer and --tokenizer-source"
        )
    tok = load_tokenizer(kind, opts.tokenizer_source)
    if tok.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer {kind} has {tok.vocab_size} ids but the model outputs {vocab_size}"
        )
    return tok


@dataclass(frozen=True)
class ImportedRun:
    """Everything a run directory holds, converted from the source (`write_run` in
    `xdlm.commands.import_` puts it on disk with the training checkpoint writer)."""

    model: torch.nn.Module
    ema_state: dict | None
    meta: dict
    config: XDLMConfig
    tokenizer: object
    step: int


def convert(source: str, opts: ImportOptions | None = None) -> ImportedRun:
    """Read `source` and build the run: MDLMDiT with the weights, kernel, schedule, tokenizer."""
    from xdlm.builders import build_model
    from xdlm.core.schedules import make_schedule, schedule_spec

    opts = opts or ImportOptions()
    if opts.seq_len is not None and opts.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (tokens per row, the run's data.seq_len), "
                         f"got {opts.seq_len}; leave it out for config.json's or 1024")  # fmt: skip
    w = read_source(source, opts.file, opts.revision)
    V = _shape(w, "embed.weight")[0]
    k, tok = kernel_k(w, opts), import_tokenizer(V, opts)
    seq_len = opts.seq_len if opts.seq_len is not None else int(w.hints.get("model_length", 1024))
    cfg = validate(XDLMConfig(
        model=model_config(w, opts),
        kernel=KernelConfig(k=k, use_mask=k < 1.0, schedule="loglinear", eps=SIGMA_EPS),
        data=DataConfig(tokenizer=tok.spec["kind"], tokenizer_source=opts.tokenizer_source,
                        tokenizer_vocab_size=None, seq_len=seq_len, mode="wrap"),
    ))  # fmt: skip
    model = build_model(cfg.model, V)
    try:
        model.load_state_dict(w.weights, strict=True)
    except RuntimeError as err:  # a tensor missing, left over or of another shape
        raise ValueError(
            f"{source}: the weights do not fit the mdlm-dit their shapes describe "
            f"({' '.join(str(err).split())}); the checkpoint is incomplete or of another "
            "architecture"
        ) from None
    meta = {
        "kernel": _kernel(V, tok.mask_id, k).spec(),
        "schedule": schedule_spec(make_schedule("loglinear", eps=SIGMA_EPS)),
        "config": cfg.to_dict(),
        "data": {"path": "", "vocab_size": V, "mask_id": tok.mask_id},
        "imported": {"source": str(source), "file": opts.file, "format": w.source_format,
                     "ema": w.ema is not None},
    }  # fmt: skip
    ema = None if w.ema is None else _ema_state(w)
    return ImportedRun(model, ema, meta, cfg, tok, w.step)


def _kernel(V: int, mask_id: int, k: float):
    from xdlm.core.kernel import MixedKernel

    return MixedKernel.udlm(V) if k == 1.0 else MixedKernel(V, mask_id, k)


def _ema_state(w: UpstreamWeights) -> dict:
    """Our EMA state layout (models/ema.py) around the imported shadow weights."""
    decay = w.ema_meta.get("decay")
    updates = w.ema_meta.get("num_updates")
    return {
        "shadow": {name: t.float() for name, t in w.ema.items()},
        "decay": float(decay) if isinstance(decay, float) else 0.9999,
        "warmup": True,
        "num_updates": int(updates) if isinstance(updates, int) else 0,
    }
