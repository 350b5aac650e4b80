"""Atomic, resumable checkpoints and loading a trained model for sampling / evaluation.

Layout of a run directory:

    RUN_DIR/config.yaml                 the resolved config
    RUN_DIR/tokenizer/                  the tokenizer (text models)
    RUN_DIR/metrics.jsonl               one JSON object per log / eval event
    RUN_DIR/checkpoints/step_000500/    model.safetensors, ema.safetensors, state.pt, meta.json
    RUN_DIR/checkpoints/latest          the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp-PID`, fsynced, renamed into place, and only then
`latest` is replaced (os.replace): a crash or `kill -9` at any moment leaves the previous
checkpoint loadable. `meta.json` records the kernel (V, mask id, k), the schedule, the data
manifest ids and the config, so `sample`/`eval` need nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from xdlm.config import XDLMConfig, config_from_dict
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule, make_schedule
from xdlm.models.ema import EMA

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema_state: dict | None,
    train_state: dict,
    meta: dict,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune to `keep_last`."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    st_save_model(model, str(tmp / "model.safetensors"))
    if ema_state is not None:
        save_file(
            {k: v.contiguous() for k, v in ema_state["shadow"].items()},
            str(tmp / "ema.safetensors"),
        )
        train_state = {
            **train_state,
            "ema_meta": {k: v for k, v in ema_state.items() if k != "shadow"},
        }
    torch.save(train_state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_latest(ckpt_root, final.name)
    _prune(ckpt_root, keep_last)
    return final


def _write_latest(ckpt_root: Path, name: str) -> None:
    tmp = ckpt_root / f"{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt_root / LATEST)
    _fsync_dir(ckpt_root)


def _prune(ckpt_root: Path, keep_last: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step_*") if ".tmp-" not in p.name)
    for old in done[: max(0, len(done) - max(keep_last, 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob("*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()


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
    return json.loads((ckpt / "meta.json").read_text())


def load_train_state(ckpt: Path, model: torch.nn.Module) -> tuple[dict, dict | None]:
    """Load weights into `model`; return (train_state, ema_state or None)."""
    missing, unexpected = st_load_model(model, str(ckpt / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt} does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; use the config the run was trained with"
        )
    state = torch.load(ckpt / "state.pt", weights_only=False)
    ema = None
    if (ckpt / "ema.safetensors").is_file():
        ema = {"shadow": load_file(str(ckpt / "ema.safetensors")), **state.pop("ema_meta", {})}
    return state, ema


def kernel_from_meta(meta: dict) -> MixedKernel:
    return MixedKernel(**meta["kernel"])


def schedule_from_meta(meta: dict) -> Schedule:
    return make_schedule(**meta["schedule"])


@dataclass
class Loaded:
    """A trained model ready for sampling / evaluation (eval mode, EMA weights by default)."""

    model: torch.nn.Module
    kernel: MixedKernel
    schedule: Schedule
    tokenizer: object | None
    config: XDLMConfig
    step: int
    checkpoint: Path


def load_model(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> Loaded:
    """Load RUN_DIR (its latest checkpoint) or a checkpoint dir for inference."""
    from xdlm.builders import build_model
    from xdlm.data.tokenizers import load_tokenizer_dir

    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    cfg = config_from_dict(meta["config"])
    model = build_model(cfg.model, meta["kernel"]["vocab_size"])
    _, ema = load_train_state(ckpt, model)
    if use_ema and ema is not None:
        averaged = EMA(model)
        averaged.load_state_dict(ema)
        averaged.copy_to(model)
    tok_dir = ckpt.parent.parent / "tokenizer"
    tokenizer = load_tokenizer_dir(tok_dir) if tok_dir.is_dir() else None
    model.to(device).eval()
    return Loaded(
        model, kernel_from_meta(meta), schedule_from_meta(meta), tokenizer, cfg, meta["step"], ckpt
    )
