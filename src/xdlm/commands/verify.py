"""`xdlm verify`: check prepared datasets, runs and exports in full.

    xdlm verify runs/data/austen                  # sizes, SHA-256, every id < V, tokenizer
    xdlm verify runs/quickstart                   # every checkpoint of the run
    xdlm verify runs/quickstart/checkpoints/step_0000500 exports/quickstart

A dataset: every split's file size and SHA-256, every id against vocab_size, the lengths / labels
files, the manifest's fields (dtype, vocab_size, special ids) and the saved tokenizer against
its fingerprint. A run or checkpoint: for every complete checkpoint, meta.json (keys, types, the
config digest), model.safetensors and ema.safetensors (exact shapes, finite), state.pt
(loadable without code, optimizer state of the parameters' shapes) and the run's tokenizer
against the fingerprint and special ids recorded. An export: config.json (digest), weights and
tokenizer. Loading data or a run for training, sampling or evaluation runs the same checks (the
cheap subset for large shards; docs/security.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check prepared datasets, runs and exports (checksums, ids, shapes, digests)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "data", nargs="+", metavar="PATH",
        help="prepared dataset (xdlm prepare --out), run, checkpoint or export directories",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    from xdlm.data.integrity import verify_dataset
    from xdlm.data.manifest import MANIFEST_FILE
    from xdlm.runs import is_export, load_export

    for directory in args.data:
        path = Path(directory)
        if (path / MANIFEST_FILE).is_file():
            m = verify_dataset(path)
            rows = ", ".join(f"{name} {info.rows} rows" for name, info in m.splits.items())
            print(f"{directory}: OK ({rows}; vocab_size {m.vocab_size}; checksums and ids checked)")
        elif is_export(path):
            load_export(path)
            print(f"{directory}: OK (export: config digest, weights and tokenizer checked)")
        else:
            names = [ckpt.name for ckpt in verify_run(path)]
            print(f"{directory}: OK ({len(names)} checkpoint(s) {', '.join(names)}: meta.json "
                  "digest, weights, EMA, optimizer state and tokenizer checked)")  # fmt: skip
    return 0


def verify_run(path: Path) -> list[Path]:
    """Check every complete checkpoint of the run (or the one checkpoint) at `path`; the
    checkpoints checked. FileNotFoundError when `path` holds none."""
    from xdlm.runs import complete_checkpoints, find_checkpoint

    if (path / "meta.json").is_file():
        ckpts = [path]
    else:
        ckpts = complete_checkpoints(path / "checkpoints") or [find_checkpoint(path)]
    for ckpt in ckpts:
        _verify_checkpoint(ckpt)
    return ckpts


def _verify_checkpoint(ckpt: Path) -> None:
    """meta.json, weights and tokenizer (`load_run`), the tokenizer's fingerprint against
    meta.json, state.pt with its optimizer state and the EMA (`load_train_state`)."""
    from xdlm.builders import build_optimizer
    from xdlm.runs import copy_ema_weights, load_run, read_meta
    from xdlm.train.checkpoint import load_optimizer_state, load_train_state

    meta = read_meta(ckpt)
    if meta.get("sharded"):
        raise ValueError(
            f"{ckpt} is a sharded (FSDP) checkpoint: its meta.json is sound; check its tensors "
            f"after `xdlm consolidate {ckpt} --out DIR` with `xdlm verify DIR`"
        )
    loaded = load_run(ckpt, use_ema=False)
    recorded = (meta.get("data") or {}).get("tokenizer_sha256")
    if recorded and loaded.tokenizer is not None and loaded.tokenizer.fingerprint() != recorded:
        raise ValueError(
            f"{ckpt / 'meta.json'}: data.tokenizer_sha256 {recorded[:12]} but the run's tokenizer "
            f"has fingerprint {loaded.tokenizer.fingerprint()[:12]}; the tokenizer was replaced"
        )
    if (ckpt / "state.pt").is_file():  # weights and EMA again, with the training state
        state, _ = load_train_state(ckpt, loaded.model)
        optimizer = build_optimizer(loaded.config.train, loaded.model)
        load_optimizer_state(ckpt / "state.pt", optimizer, state["optimizer"])
    else:
        copy_ema_weights(ckpt, loaded.model)
