"""A trained run, loaded for inference: `load_run` is what every command other than `train` uses.

    run = load_run("runs/quickstart")            # the latest checkpoint, EMA weights
    run.model, run.kernel, run.schedule, run.tokenizer, run.config, run.step

Layout of a run directory (written by `xdlm train`, see `xdlm.train.checkpoint`):

    RUN_DIR/config.yaml                 the resolved config of the run
    RUN_DIR/tokenizer/                  the tokenizer (text models)
    RUN_DIR/checkpoints/latest          the name of the newest complete checkpoint
    RUN_DIR/checkpoints/step_N/         model.safetensors, ema.safetensors, state.pt, meta.json

`meta.json` records the kernel (V, mask id, k), the schedule and the config, so inference needs
nothing else. Loading reads only safetensors and JSON: the pickled training state (`state.pt`,
optimizer and RNG states) is for `xdlm train --resume` alone and is never opened here.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import load_model as st_load_model

from xdlm.builders import build_model
from xdlm.config import XDLMConfig, config_from_dict
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule, make_schedule
from xdlm.data.tokenizers import load_tokenizer_dir

LATEST = "latest"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Published checkpoints under `ckpt_root`, oldest first (a `step_N` directory exists only
    after its save completed and was renamed into place)."""
    return sorted(
        p for p in ckpt_root.glob("step_*") if ".tmp-" not in p.name and (p / "meta.json").is_file()
    )


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (via `latest`; when `latest` is missing or
    names a removed directory, the newest complete checkpoint) or a checkpoint path."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    pointer = path / "checkpoints" / LATEST
    if pointer.is_file():
        ckpt = path / "checkpoints" / pointer.read_text().strip()
        if (ckpt / "meta.json").is_file():
            return ckpt
    done = complete_checkpoints(path / "checkpoints")
    if done:
        if pointer.is_file():
            warnings.warn(
                f"{pointer} names {ckpt.name}, which is missing or incomplete; using the newest "
                f"complete checkpoint {done[-1].name}",
                stacklevel=2,
            )
        return done[-1]
    if not path.exists():
        raise FileNotFoundError(
            f"no run or checkpoint at {path}; pass the --out dir of `xdlm train`"
        )
    raise FileNotFoundError(
        f"{path} holds no complete checkpoint (no checkpoints/latest or "
        "meta.json); train longer than one save interval or pass a step dir"
    )


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def read_run_config(path: str | Path) -> XDLMConfig:
    """The config a run was trained with (its latest checkpoint's meta.json, or the config.json
    of an `xdlm export` directory / Hub id)."""
    from xdlm.hub import export_config, is_export, resolve_model_path

    path = resolve_model_path(path)
    if is_export(path):
        return config_from_dict(export_config(path)["config"])
    return config_from_dict(read_meta(find_checkpoint(path))["config"])


def latest_config(run_dir: str | Path) -> XDLMConfig:
    """The config a run continues with: its latest checkpoint's, else its config.yaml (a run
    stopped before its first checkpoint). FileNotFoundError when `run_dir` holds no run."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints" / LATEST).is_file():
        return read_run_config(run_dir)
    if (run_dir / "config.yaml").is_file():
        return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    raise FileNotFoundError(
        f"--resume: {run_dir} holds no run (no config.yaml, no checkpoint); drop --resume to "
        "start a new run there, or pass the --out of an existing run"
    )


def kernel_from_meta(meta: dict) -> MixedKernel:
    """The run's MixedKernel from `meta["kernel"]` (V, mask id, k)."""
    return MixedKernel(**meta["kernel"])


def schedule_from_meta(meta: dict) -> Schedule:
    """The run's noise schedule α_t from `meta["schedule"]`."""
    return make_schedule(**meta["schedule"])


@contextlib.contextmanager
def readable(path: Path):
    """A missing / truncated / corrupt safetensors file -> an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the checkpoint is incomplete")
    try:
        yield
    except SafetensorError as err:
        raise ValueError(
            f"{path} is truncated or corrupt ({err}); load another checkpoint of the run "
            "(checkpoints/step_N) or retrain"
        ) from None


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load `ckpt/model.safetensors` into `model`; every tensor must match."""
    with readable(ckpt / "model.safetensors"):
        try:
            missing, unexpected = st_load_model(
                model, str(ckpt / "model.safetensors"), strict=False
            )
        except RuntimeError as err:  # shapes differ: the config / meta.json is not the run's
            raise ValueError(
                f"checkpoint {ckpt} does not fit the model its meta.json describes "
                f"({str(err).splitlines()[-1].strip()[:300]}); meta.json was edited or belongs "
                "to another run"
            ) from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt} does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; use the config the run was trained with"
        )


@torch.no_grad()
def copy_ema_weights(ckpt: Path, model: torch.nn.Module) -> bool:
    """Overwrite `model`'s parameters with the EMA averages of `ckpt/ema.safetensors`.

    Returns False (model unchanged) when the run kept no EMA (`train.ema_decay=0`)."""
    path = ckpt / "ema.safetensors"
    if not path.is_file():
        return False
    with readable(path):
        shadow = load_file(str(path))
    params = dict(model.named_parameters())
    if shadow.keys() != params.keys():
        raise ValueError(
            f"{path} holds parameters {sorted(shadow)[:5]}... that do not match the model "
            f"{sorted(params)[:5]}...; use the config the run was trained with"
        )
    for name, p in params.items():
        p.copy_(shadow[name])
    return True


def check_loaded(ckpt: Path, meta: dict, model: torch.nn.Module, tokenizer) -> None:
    """`meta.json` against itself, the tokenizer and the weights; the weights finite. An edited
    mask id or k would otherwise sample silently wrong, NaN weights emit empty samples."""
    kernel, data, where = meta["kernel"], meta.get("data", {}), ckpt / "meta.json"
    use_mask = meta["config"]["kernel"].get("use_mask", True)
    if use_mask and float(kernel["k"]) != float(meta["config"]["kernel"]["k"]):
        raise ValueError(
            f"{where}: kernel k={kernel['k']} but its config says kernel.k="
            f"{meta['config']['kernel']['k']}; the file was edited, restore it from the run"
        )
    others = {"the data": data.get("mask_id"), "the tokenizer": getattr(tokenizer, "mask_id", None)}
    for name, other in others.items():
        if use_mask and other is not None and kernel["mask_id"] != other:
            raise ValueError(
                f"{where}: kernel mask_id={kernel['mask_id']} but {name} has mask id {other}; "
                "the file was edited, restore it from the run"
            )
    head = getattr(getattr(model, "output_head", None), "weight", None)
    if head is not None and head.shape[0] != kernel["vocab_size"]:
        raise ValueError(
            f"{where}: vocab_size={kernel['vocab_size']} but the weights output {head.shape[0]} "
            "logits; the file was edited, restore it from the run"
        )
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(
                f"checkpoint {ckpt} has non-finite (NaN/inf) weights in {name}; training "
                "diverged before this save: load an earlier checkpoints/step_N or retrain "
                "(lower train.lr, precision=fp32)"
            )


@dataclass
class LoadedRun:
    """A trained model ready for sampling / evaluation (eval mode, EMA weights by default)."""

    model: torch.nn.Module
    kernel: MixedKernel
    schedule: Schedule
    tokenizer: object | None
    config: XDLMConfig
    step: int
    checkpoint: Path


def load_run(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> LoadedRun:
    """Load RUN_DIR (its latest checkpoint), a checkpoint dir, an `xdlm export` dir or a Hub id
    of one for inference. An export holds one set of weights (chosen when exporting), so
    `use_ema` applies to runs and checkpoints."""
    from xdlm.hub import is_export, load_export, resolve_model_path

    path = resolve_model_path(path)
    if is_export(path):
        return load_export(path, device)
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    if meta.get("sharded"):
        raise ValueError(
            f"{ckpt} is a sharded (FSDP) checkpoint; turn it into a single-file one first: "
            f"xdlm consolidate {ckpt} --out DIR"
        )
    cfg = config_from_dict(meta["config"])
    model = build_model(cfg.model, meta["kernel"]["vocab_size"])
    load_weights(ckpt, model)
    if use_ema:
        copy_ema_weights(ckpt, model)
    tok_dir = ckpt.parent.parent / "tokenizer"
    tokenizer = load_tokenizer_dir(tok_dir) if tok_dir.is_dir() else None
    check_loaded(ckpt, meta, model, tokenizer)
    model.to(device).eval()
    return LoadedRun(
        model, kernel_from_meta(meta), schedule_from_meta(meta), tokenizer, cfg, meta["step"], ckpt
    )
