"""Atomic, resumable checkpoints (writing, and reading back for `--resume`).

Layout of a run directory:

    RUN_DIR/config.yaml                 the resolved config
    RUN_DIR/tokenizer/                  the tokenizer (text models)
    RUN_DIR/metrics.jsonl               one JSON object per log / eval event
    RUN_DIR/checkpoints/step_000500/    model.safetensors, ema.safetensors, state.pt, meta.json
    RUN_DIR/checkpoints/step_000500/    FSDP runs instead: dcp/ (sharded model, optimizer, EMA),
                                        state.pt, meta.json ("sharded": true); see
                                        `xdlm consolidate` for the single-file layout
    RUN_DIR/checkpoints/latest          the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp-PID`, fsynced, renamed into place, and only then
`latest` is replaced (os.replace): a crash or `kill -9` at any moment leaves the previous
checkpoint loadable. `meta.json` records the kernel (V, mask id, k), the schedule, the data
manifest ids and the config, so `sample`/`eval` need nothing else: they load a run with
`xdlm.runs.load_run`, which never imports this package.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save_model as st_save_model

from xdlm.models.ema import EMA
from xdlm.runs import LATEST, load_weights


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
        train_state = {**train_state, "ema_meta": _ema_meta(ema_state)}
    torch.save(train_state, tmp / "state.pt")
    _publish(tmp, final, {**meta, "step": step}, keep_last)
    return final


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_state: dict | None,
    train_state: dict,
    meta: dict,
    keep_last: int = 2,
) -> Path:
    """FSDP: every rank calls this. `torch.distributed.checkpoint` (DCP) writes each rank's
    shards of model, optimizer and EMA shadow into `step_N/dcp/`; rank 0 writes `state.pt`
    (`train_state`, which holds every rank's loader/RNG state) and `meta.json` (with
    `"sharded": true`), then publishes with the same tmp -> rename -> `latest` order as
    `save_checkpoint`. `xdlm consolidate` turns the result into a single-file checkpoint."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f"{final.name}.tmp-sharded"
    main = dist.get_rank() == 0
    if main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema_state is not None:
        state["ema"] = ema_state["shadow"]
        train_state = {**train_state, "ema_meta": _ema_meta(ema_state)}
    dcp.save(state, checkpoint_id=tmp / "dcp")
    dist.barrier()
    if main:
        torch.save(train_state, tmp / "state.pt")
        sharded = {**meta, "step": step, "sharded": True, "world_size": dist.get_world_size()}
        _publish(tmp, final, sharded, keep_last)
    dist.barrier()
    return final


def _ema_meta(ema_state: dict) -> dict:
    return {k: v for k, v in ema_state.items() if k != "shadow"}


def _publish(tmp: Path, final: Path, meta: dict, keep_last: int) -> None:
    """Write meta.json, fsync everything under `tmp`, rename it to `final`, update `latest`."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_latest(final.parent, final.name)
    _prune(final.parent, keep_last)


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


def load_train_state(ckpt: Path, model: torch.nn.Module) -> tuple[dict, dict | None]:
    """Load weights into `model`; return (train_state, ema_state or None)."""
    load_weights(ckpt, model)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    ema = None
    if (ckpt / "ema.safetensors").is_file():
        ema = {"shadow": load_file(str(ckpt / "ema.safetensors")), **state.pop("ema_meta", {})}
    return state, ema


def load_sharded_state(
    ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ema: EMA | None
) -> dict:
    """Load a DCP checkpoint (`save_sharded_checkpoint`) into `model`, `optimizer` and `ema`
    in place, resharding to the current world size (also to one process, without a process
    group, and to a DDP / unsharded model); returns `state.pt` (train state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        state = {"model": model.state_dict()}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.shadow
    dcp.load(state, checkpoint_id=ckpt / "dcp")
    if optimizer is not None:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    train_state = torch.load(ckpt / "state.pt", weights_only=False)
    if ema is not None:
        ema.load_state_dict({"shadow": ema.shadow, **train_state.get("ema_meta", {})})
    return train_state
