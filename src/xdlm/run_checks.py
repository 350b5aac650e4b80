"""The checks every load of a run's checkpoint makes (`xdlm.runs.load_run`, `xdlm train
--resume`, `xdlm verify RUN`), each failure a ValueError naming the file and the field.

- `meta.json` (`read_meta`): JSON with the keys and types the loaders use, and its content
  equal to the digest recorded when it was saved (`config_sha256`, SHA-256 of the canonical
  JSON of everything else: kernel, schedule, config, data, step). An edit of `k`, made
  consistently in `kernel` and `config`, changes the digest. Like the manifest's checksums it
  detects edits and accidents, not an attacker who recomputes it (it is not a signature).
- tensors (`check_tensors`): the names and shapes of a weights / EMA file equal the model's
  parameters exactly (`Tensor.copy_` would broadcast a (1,) tensor into a (32, 32) weight) and
  every value is finite.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import make_schedule
from xdlm.files import read_json, require

META_FILE = "meta.json"
DIGEST_KEY = "config_sha256"


def meta_digest(meta: dict) -> str:
    """SHA-256 of the canonical JSON of `meta` without its `config_sha256`."""
    body = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def with_digest(meta: dict) -> dict:
    """`meta` as JSON reads it back, with its digest recorded (written by every save)."""
    plain = json.loads(json.dumps(meta))
    return {**plain, DIGEST_KEY: meta_digest(plain)}


def read_meta(ckpt: str | Path) -> dict:
    """`ckpt/meta.json`, its keys and types checked and its digest verified."""
    path = Path(ckpt) / META_FILE
    meta = read_json(path, "the description of a checkpoint")
    require(meta, str(path), kernel=dict, schedule=dict, config=dict, step=int)
    check_kernel(meta["kernel"], meta["schedule"], path)
    check_digest(meta, path)
    return meta


def check_kernel(kernel: dict, schedule: dict, path: Path) -> None:
    """`kernel` {vocab_size, mask_id, k} and `schedule` (read from `path`) build a MixedKernel
    and a schedule; ValueError naming `path` and the field otherwise."""
    require(kernel, f"{path}: kernel", vocab_size=int, mask_id=(int, type(None)), k=float)
    for field, build, spec in (
        ("kernel", MixedKernel, {k: kernel[k] for k in ("vocab_size", "mask_id", "k")}),
        ("schedule", make_schedule, schedule),
    ):
        try:
            build(**spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {field} {spec} is not valid ({err})") from None


def check_digest(data: dict, path: Path) -> None:
    """`data[config_sha256]` (read from `path`) against `meta_digest(data)`; a file saved
    before digests were recorded gets a warning."""
    recorded = data.get(DIGEST_KEY)
    if recorded is None:
        warnings.warn(
            f"{path} records no {DIGEST_KEY} (saved by an older xdlm, or the key was removed): "
            "edits of it cannot be detected",
            stacklevel=3,
        )
    elif recorded != meta_digest(data):
        raise ValueError(
            f"{path}: {DIGEST_KEY} does not match its content (kernel, config, ...): the file "
            "was edited after it was saved (e.g. kernel.k). Restore it, or use another "
            "checkpoint (checkpoints/step_N)"
        )


def check_tensors(path: Path, tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """`tensors` (read from `path`) hold exactly `model`'s parameters, each of its shape (never
    broadcast), all finite."""
    params = dict(model.named_parameters())
    if tensors.keys() != params.keys():
        missing, extra = sorted(params.keys() - tensors), sorted(tensors.keys() - params)
        raise ValueError(
            f"{path} does not hold the model's parameters (missing {missing[:5]}, unexpected "
            f"{extra[:5]}); use the config the run was trained with"
        )
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, the model's is "
                f"{tuple(p.shape)}; the file was edited or belongs to another run"
            )
    check_finite(path, tensors.items())


def check_finite(path: Path, named) -> None:
    """ValueError naming `path` and the first tensor of `named` ((name, tensor) pairs) holding
    NaN or inf."""
    for name, t in named:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(
                f"{path}: tensor {name} holds non-finite (NaN/inf) values; training diverged "
                "before this save or the file was edited: load an earlier checkpoints/step_N or "
                "retrain (lower train.lr, precision=fp32)"
            )
