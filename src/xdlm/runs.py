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

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from safetensors.torch import load_model as st_load_model

from xdlm.builders import build_model
from xdlm.config import XDLMConfig, config_from_dict
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule, make_schedule
from xdlm.data.tokenizers import load_tokenizer_dir

LATEST = "latest"


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (via `latest`) or a checkpoint path."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    pointer = path / "checkpoints" / LATEST
    if pointer.is_file():
        ckpt = path / "checkpoints" / pointer.read_text().strip()
        if (ckpt / "meta.json").is_file():
            return ckpt
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
    """The config a run was trained with (from its latest checkpoint's meta.json)."""
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


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load `ckpt/model.safetensors` into `model`; every tensor must match."""
    missing, unexpected = st_load_model(model, str(ckpt / "model.safetensors"), strict=False)
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
    """Load RUN_DIR (its latest checkpoint) or a checkpoint dir for inference."""
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
    model.to(device).eval()
    return LoadedRun(
        model, kernel_from_meta(meta), schedule_from_meta(meta), tokenizer, cfg, meta["step"], ckpt
    )
