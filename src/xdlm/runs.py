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

This module also reads what `xdlm export` writes (`xdlm.hub`, which imports this one): an
export directory, or a Hub id of one, loads like a run.

Trust comes from the caller, never from the files read here: a model whose loading would run
Python code of its own is built only with `trust_remote_code=True` (the user's
`--trust-remote-code`; `builders.grant_remote_code`), and `checkpoints/latest` is followed only
to a checkpoint directory inside that same `checkpoints/`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import load_model as st_load_model

from xdlm import run_checks
from xdlm.builders import build_model, grant_remote_code
from xdlm.config import XDLMConfig, config_from_dict
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule, make_schedule
from xdlm.data.tokenizers import load_tokenizer_dir
from xdlm.files import read_json, read_yaml, require
from xdlm.run_checks import check_digest, check_finite, check_kernel, check_tensors

LATEST = "latest"
EXPORT_FORMAT = 1
CONFIG_FILE = "config.json"  # of an export
WEIGHTS_FILE = "model.safetensors"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Published checkpoints under `ckpt_root`, oldest first (a `step_N` directory exists only
    after its save completed and was renamed into place; a symbolic link is never one)."""
    return sorted(
        p
        for p in ckpt_root.glob("step_*")
        if ".tmp-" not in p.name and not p.is_symlink() and (p / "meta.json").is_file()
    )


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (via `latest`; when `latest` is missing or
    names a removed directory, the newest complete checkpoint) or a checkpoint path."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    pointer = path / "checkpoints" / LATEST
    if pointer.is_file():
        ckpt = latest_target(pointer)
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


def latest_target(pointer: Path) -> Path:
    """The checkpoint `checkpoints/latest` names: one directory name (at most 255 characters;
    the first 4 KiB of the file are read), resolved inside that same `checkpoints/`. An absolute
    path, a `..`, a path with `/` or a name whose link leads out of `checkpoints/` is refused (a
    run's files never lead loading out of the run)."""
    with open(pointer, encoding="utf-8", errors="replace") as f:
        name = f.read(4096).strip()  # a name is short: never read a huge file whole
    root = pointer.parent
    target = root / name
    plain = name not in ("", ".", "..") and Path(name).name == name and len(name) <= 255
    if not plain or target.resolve().parent != root.resolve():
        raise ValueError(
            f"{pointer} names {name[:200]!r}, which is not a checkpoint directory inside "
            f"{root}; it must hold one name like step_0000500 (write the newest step_N there, "
            "or delete the file to load the newest complete checkpoint)"
        )
    return target


def read_meta(ckpt: Path) -> dict:
    """`ckpt/meta.json`, checked (`xdlm.run_checks.read_meta`: keys, types, digest)."""
    return run_checks.read_meta(ckpt)


def read_run_config(path: str | Path, trust_remote_code: bool = False) -> XDLMConfig:
    """The config a run was trained with (its latest checkpoint's meta.json, or the config.json
    of an `xdlm export` directory / Hub id), with `model.trust_remote_code` the caller's
    (`builders.grant_remote_code`: a model with code of its own is refused without it)."""
    path = resolve_model_path(path)
    if is_export(path):
        return _saved_config(export_config(path)["config"], trust_remote_code, path / CONFIG_FILE)
    ckpt = find_checkpoint(path)
    return _saved_config(read_meta(ckpt)["config"], trust_remote_code, ckpt / "meta.json")


def latest_config(run_dir: str | Path, trust_remote_code: bool = False) -> XDLMConfig:
    """The config a run continues with: its latest checkpoint's, else its config.yaml (a run
    stopped before its first checkpoint). FileNotFoundError when `run_dir` holds no run."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints" / LATEST).is_file():
        return read_run_config(run_dir, trust_remote_code)
    if (run_dir / "config.yaml").is_file():
        saved = read_yaml(run_dir / "config.yaml") or {}
        return _saved_config(saved, trust_remote_code, run_dir / "config.yaml")
    raise FileNotFoundError(
        f"--resume: {run_dir} holds no run (no config.yaml, no checkpoint); drop --resume to "
        "start a new run there, or pass the --out of an existing run"
    )


def _saved_config(saved: dict, trust_remote_code: bool, source: Path) -> XDLMConfig:
    """The config saved in the file `source`, its model as this invocation may build it; a bad
    key or value names `source`."""
    try:
        cfg = config_from_dict(saved)
    except ValueError as err:
        raise ValueError(f"{source}: config: {err}") from None
    return grant_remote_code(cfg, trust_remote_code, source)


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
    """Load `ckpt/model.safetensors` (of a checkpoint or an export) into `model`; every tensor
    must match in name and shape, and be finite."""
    with readable(ckpt / "model.safetensors"):
        try:
            missing, unexpected = st_load_model(
                model, str(ckpt / "model.safetensors"), strict=False
            )
        except RuntimeError as err:  # shapes differ: the config / meta.json is not the run's
            raise ValueError(
                f"{ckpt / 'model.safetensors'} does not fit the model its meta.json (config.json "
                f"of an export) describes ({str(err).splitlines()[-1].strip()[:300]}); the file "
                "was edited or belongs to another run"
            ) from None
    if missing or unexpected:
        raise ValueError(
            f"{ckpt / 'model.safetensors'} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; use the config the run was trained with"
        )
    check_finite(ckpt / "model.safetensors", model.named_parameters())


@torch.no_grad()
def copy_ema_weights(ckpt: Path, model: torch.nn.Module) -> bool:
    """Overwrite `model`'s parameters with the EMA averages of `ckpt/ema.safetensors`.

    Returns False (model unchanged) when the run kept no EMA (`train.ema_decay=0`)."""
    path = ckpt / "ema.safetensors"
    if not path.is_file():
        return False
    with readable(path):
        shadow = load_file(str(path))
    check_tensors(path, shadow, model)  # names, exact shapes, finite
    for name, p in model.named_parameters():
        p.copy_(shadow[name])
    return True


def check_loaded(ckpt: Path, meta: dict, model: torch.nn.Module, tokenizer) -> None:
    """`meta.json` against itself, the tokenizer and the weights (which `load_weights` and
    `copy_ema_weights` checked finite). An edited mask id or k would otherwise sample silently
    wrong."""
    kernel, data, where = meta["kernel"], meta.get("data") or {}, ckpt / "meta.json"
    config = config_from_dict(meta["config"]).kernel  # load_run checked it (_saved_config)
    use_mask = config.use_mask
    if use_mask and float(kernel["k"]) != float(config.k):
        raise ValueError(
            f"{where}: kernel k={kernel['k']} but its config says kernel.k="
            f"{config.k}; the file was edited, restore it from the run"
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
    path: str | Path,
    device: str | torch.device = "cpu",
    use_ema: bool = True,
    trust_remote_code: bool = False,
) -> LoadedRun:
    """Load RUN_DIR (its latest checkpoint), a checkpoint dir, an `xdlm export` dir or a Hub id
    of one for inference. An export holds one set of weights (chosen when exporting), so
    `use_ema` applies to runs and checkpoints. `trust_remote_code`: the user's
    `--trust-remote-code`, needed for a model that runs Python code of its own (what the run's
    files say never grants it)."""
    path = resolve_model_path(path)
    if is_export(path):
        return load_export(path, device, trust_remote_code)
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    if meta.get("sharded"):
        raise ValueError(
            f"{ckpt} is a sharded (FSDP) checkpoint; turn it into a single-file one first: "
            f"xdlm consolidate {ckpt} --out DIR"
        )
    cfg = _saved_config(meta["config"], trust_remote_code, ckpt / "meta.json")
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


# ---------------------------------------------------------------- `xdlm export` directories


def is_export(path: str | Path) -> bool:
    """True when `path` is a directory written by `xdlm.hub.export_run`."""
    config = Path(path) / CONFIG_FILE
    return config.is_file() and "xdlm_format" in read_json(config, "a model's config")


def export_config(directory: str | Path) -> dict:
    """The config.json of an export, checked for a format this library reads, the keys and
    types the loader uses, and its digest (`xdlm.run_checks.check_digest`)."""
    path = Path(directory) / CONFIG_FILE
    config = read_json(path, "the config of an xdlm export")
    require(config, str(path), xdlm_format=int, config=dict, architecture=dict, kernel=dict,
            training=dict)  # fmt: skip
    require(config["architecture"], f"{path}: architecture", vocab_size=int)
    require(config["kernel"], f"{path}: kernel", schedule=dict)
    check_kernel(config["kernel"], config["kernel"]["schedule"], path)
    require(config["training"], f"{path}: training", steps=int)
    check_digest(config, path)
    if config["xdlm_format"] != EXPORT_FORMAT:
        raise ValueError(f"{directory} has xdlm_format {config['xdlm_format']}, this library "
                         f"reads {EXPORT_FORMAT}; upgrade xdlm")  # fmt: skip
    return config


def resolve_model_path(path: str | Path) -> Path:
    """A local run / checkpoint / export dir as is; a Hub id ("org/name") downloaded."""
    local = Path(path)
    if local.exists() or str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        return local
    if local.parent.is_dir():  # "runs/x" with a local runs/: a mistyped run, not a Hub id
        found = sorted(p.name for p in local.parent.iterdir() if p.is_dir())[:10]
        raise FileNotFoundError(
            f"no run at {path}: {local.parent}/ exists but holds no {local.name!r} (it holds "
            f"{found or 'no directory'}); fix the path (a Hub id 'org/name' is looked up only "
            f"when no local directory {local.parent}/ exists)"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ValueError(f"{path} is not a local path; loading it from the Hub needs "
                         "huggingface_hub: pip install 'xdlm[hf]'") from err  # fmt: skip
    try:
        return Path(snapshot_download(str(path)))
    except Exception as err:  # offline, missing repo, auth: many error types
        raise FileNotFoundError(
            f"{path} is neither a local directory nor a downloadable Hub repo ({err}); pass a "
            "run dir, a checkpoint dir or an `xdlm export` dir"
        ) from err


def load_export(
    directory: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False
) -> LoadedRun:
    """An export directory -> `LoadedRun` (eval mode), from JSON and safetensors only."""
    directory = Path(directory)
    config = export_config(directory)
    cfg = _saved_config(config["config"], trust_remote_code, directory / CONFIG_FILE)
    model = build_model(cfg.model, config["architecture"]["vocab_size"])
    load_weights(directory, model)  # its WEIGHTS_FILE: exact shapes, finite
    spec = {k: config["kernel"][k] for k in ("vocab_size", "mask_id", "k")}
    schedule = make_schedule(**config["kernel"]["schedule"])
    tokenizer = load_tokenizer_dir(directory)
    if spec["mask_id"] not in (None, tokenizer.mask_id):
        raise ValueError(
            f"{directory / CONFIG_FILE}: kernel mask_id={spec['mask_id']} but the tokenizer's "
            f"mask id is {tokenizer.mask_id}; restore the file"
        )
    model.to(device).eval()
    step = config["training"]["steps"]
    return LoadedRun(model, MixedKernel(**spec), schedule, tokenizer, cfg, step, directory)
