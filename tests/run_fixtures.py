"""A tiny char-level run configuration shared by the fault-injection tests (conftest.py builds
the `tiny_run` fixture from it)."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
from pathlib import Path

from xdlm.config import XDLMConfig, load_config
from xdlm.data.corpora import embedded_corpus_path


def write_corpus(path: Path, chars: int = 60_000) -> Path:
    """The first `chars` characters of the embedded corpus as a text file."""
    path.write_text(gzip.open(embedded_corpus_path(), "rt").read()[:chars])
    return path


def fill_disk(directory: Path, leave: int) -> None:
    """Fill the file system of `directory` (a `small_fs`) until `leave` bytes are free."""
    free = shutil.disk_usage(directory).free
    with open(directory / "filler", "wb") as fh:
        fh.write(b"\0" * max(free - leave, 0))


def tiny_sets(corpus, data_dir, *extra) -> list[str]:
    """The `KEY=VALUE` settings of `tiny_cfg` (for `xdlm train --set ...`)."""
    return [
        f"data.path={data_dir}", f"data.sources=[{corpus}]", "data.tokenizer=char",
        "data.seq_len=32", "data.batch_size=8", "model.n_layers=1", "model.d_model=32",
        "model.n_heads=2", "train.steps=4", "train.warmup_steps=1", "train.log_every=1",
        "train.eval_every=2", "train.eval_batches=1", "train.save_every=2",
        "train.ema_decay=0.9", "train.precision=fp32", *extra,
    ]  # fmt: skip


TINY_TOKENS = 8 * 32  # one micro-batch of `tiny_cfg`: 8 rows of 32 tokens (packed, no padding)


def nan_nats(loss):
    """`loss` (a diffusion loss function) with its nats made NaN: a non-finite step."""

    def nan_loss(*args, **kwargs):
        out = loss(*args, **kwargs)
        return dataclasses.replace(out, nats=out.nats * float("nan"))

    return nan_loss


def tiny_cfg(corpus, data_dir, *extra) -> XDLMConfig:
    """1-layer, 32-wide DiT on 32-character rows; 4 steps, checkpoints at steps 2 and 4."""
    return load_config(None, tiny_sets(corpus, data_dir, *extra))


def rewrite_meta(ckpt: Path, edit) -> None:
    """Apply `edit(meta)` to `ckpt/meta.json` and record the new digest, as an editor who
    knows the format would: what the checks behind the digest must still catch."""
    import json

    from xdlm.run_checks import with_digest

    meta = json.loads((ckpt / "meta.json").read_text())
    edit(meta)
    (ckpt / "meta.json").write_text(json.dumps(with_digest(meta)))
