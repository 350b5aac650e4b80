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

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save_model as st_save_model

from xdlm.files import require
from xdlm.models.ema import EMA
from xdlm.run_checks import check_tensors, with_digest
from xdlm.runs import LATEST, complete_checkpoints, find_checkpoint, load_weights, readable
from xdlm.train.safe_load import load_dcp, load_state_file


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
    with _removed_on_failure(tmp):
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


@contextlib.contextmanager
def _removed_on_failure(tmp: Path | None):
    """A save that fails (ENOSPC, an exception, Ctrl-C) leaves no partial `tmp` behind: the
    disk space it took is freed and only complete checkpoints remain."""
    try:
        yield
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    with _removed_on_failure(tmp if main else None):
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
    """Write meta.json (with its digest), fsync everything under `tmp`, rename it to `final`,
    update `latest`."""
    (tmp / "meta.json").write_text(json.dumps(with_digest(meta), indent=2))
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
    """Keep the newest `keep_last` (at least 1) checkpoints. Each older one is first renamed to
    `step_N.tmp-pruned` (at once no longer a checkpoint), then deleted with the other
    temporaries, best effort: what cannot be deleted now (a busy file on a network mount) is
    retried by the next save or start."""
    done = complete_checkpoints(ckpt_root)
    for old in done[: max(0, len(done) - max(keep_last, 1))]:
        os.rename(old, old.with_name(f"{old.name}.tmp-pruned"))
    remove_partial_saves(ckpt_root.parent)


def remove_partial_saves(run_dir: str | Path) -> list[Path]:
    """Delete what interrupted saves and prunes left (`*.tmp-*` under checkpoints/); call only
    while holding the run's lock (no other writer). Returns what was removed."""
    stale = list((Path(run_dir) / "checkpoints").glob("*.tmp-*"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a complete checkpoint (what `--resume` continues)."""
    root = Path(run_dir) / "checkpoints"
    return (root / LATEST).is_file() or bool(complete_checkpoints(root))


def newest_checkpoint_name(run_dir: str | Path) -> str | None:
    """The name of the checkpoint `--resume` would continue from, or None."""
    return find_checkpoint(run_dir).name if has_checkpoint(run_dir) else None


def load_train_state(ckpt: Path, model: torch.nn.Module) -> tuple[dict, dict | None]:
    """Resume: load weights into `model` (exact shapes, finite); return (train_state, ema_state
    or None), the EMA's tensors checked like the weights (`check_tensors`). `state.pt` is read
    with `weights_only=True` (`safe_load`): a file that needs more is refused."""
    load_weights(ckpt, model)
    state = load_state_file(ckpt / "state.pt")
    require(state, str(ckpt / "state.pt"), optimizer=dict, ranks=list, progress=dict)
    ema = None
    if (ckpt / "ema.safetensors").is_file():
        with readable(ckpt / "ema.safetensors"):
            shadow = load_file(str(ckpt / "ema.safetensors"))
        check_tensors(ckpt / "ema.safetensors", shadow, model)
        ema = {"shadow": shadow, **state.pop("ema_meta", {})}
    return state, ema


def load_optimizer_state(path: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)` (read from `path`) after checking what torch does not:
    every per-parameter tensor (Adam's moments) has its parameter's shape; an error names
    `path` instead of failing at the first step."""
    try:
        groups, per_param = state["param_groups"], state["state"]
        ids = [i for group in groups for i in group["params"]]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: optimizer is not an optimizer state; restore the file or "
                         "use another checkpoint") from None  # fmt: skip
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(ids) != len(params):
        raise ValueError(f"{path}: optimizer holds {len(ids)} parameters, the model has "
                         f"{len(params)}; the file belongs to another run")  # fmt: skip
    for i, p in zip(ids, params, strict=True):
        for key, value in per_param.get(i, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                raise ValueError(
                    f"{path}: optimizer state {key} of parameter {i} has shape "
                    f"{tuple(value.shape)}, the parameter's is {tuple(p.shape)}; the file was "
                    "edited or belongs to another run"
                )
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: optimizer state does not fit ({err})") from None


def load_sharded_state(
    ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ema: EMA | None
) -> dict:
    """Load a DCP checkpoint (`save_sharded_checkpoint`) into `model`, `optimizer` and `ema`
    in place, resharding to the current world size (also to one process, without a process
    group, and to a DDP / unsharded model); returns `state.pt` (train state)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        state = {"model": model.state_dict()}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.shadow
    load_dcp(state, ckpt / "dcp")
    if optimizer is not None:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    train_state = load_state_file(ckpt / "state.pt")
    if ema is not None:
        require(train_state, str(ckpt / "state.pt"), ema_meta=dict)
        ema.load_state_dict({"shadow": ema.shadow, **train_state["ema_meta"]})
    return train_state
