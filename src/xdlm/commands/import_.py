"""`xdlm import`: a released MDLM / UDLM / Duo / XDLM checkpoint -> an xdlm run directory.

    xdlm import kuleshov-group/mdlm-owt --out runs/mdlm-owt                (Hub id, needs internet)
    xdlm import ./mdlm-owt --out runs/mdlm-owt      (a local HF repo dir: config.json + weights)
    xdlm import mdlm.ckpt --out runs/mdlm --k 0 --tokenizer-source ../shared/data/tokenizers/gpt2
    xdlm import Mzero17/XDLM --file PATH/IN/REPO.ckpt --out runs/xdlm --k 0.1   (a .ckpt on the Hub)

Then `xdlm sample --ckpt runs/mdlm-owt` and `xdlm eval --ckpt runs/mdlm-owt ...` work as for a
trained run (EMA weights by default when the source has them). Nothing from the source is
executed: a Lightning .ckpt is read with torch's weights-only unpickler and refused when it names
anything but tensors, containers and known metadata classes; config.json is read as JSON.
See xdlm.importing for the defaults (architecture, time input, tokenizer, k).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xdlm.models.mdlm_dit import TIME_INPUTS


def register(sub) -> None:
    p = sub.add_parser(
        "import",
        help="import a released MDLM-lineage checkpoint as a run directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="a .ckpt file, a HF repo directory or a Hub id owner/name")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--file", default=None, help="a .ckpt inside the Hub repo / directory")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument(
        "--k",
        type=float,
        default=None,
        help="uniform share k (default from the source: MDLM 0, UDLM 1, XDLM algo.k1)",
    )
    p.add_argument("--n-heads", type=int, default=None, help="default: config.json or d/64")
    p.add_argument("--time-input", choices=TIME_INPUTS, default=None,
                   help="time embedding input (default: config.json, else none)")  # fmt: skip
    p.add_argument("--tokenizer", default=None, help="default: gpt2-mdlm (V=50258), bert (30522)")
    p.add_argument("--tokenizer-source", default=None, help="local tokenizer dir or Hub name")
    p.add_argument("--seq-len", type=int, default=None, help="default: config.json or 1024")
    p.set_defaults(func=run)


def import_checkpoint(source: str, out: str | Path, opts=None) -> Path:
    """Convert `source` (xdlm.importing.convert) and write it as the run directory `out`;
    returns the checkpoint directory."""
    from xdlm.importing import convert

    if (Path(out) / "checkpoints").exists():
        raise ValueError(f"{out} already holds a run; pass a new --out directory")
    return write_run(convert(source, opts), Path(out))


def write_run(run, out: Path) -> Path:
    """The run directory of `xdlm train` (checkpoints/, tokenizer/, config.yaml) for an
    `ImportedRun`; the weights go through the training checkpoint writer."""
    from xdlm.config import save_config
    from xdlm.train.checkpoint import save_checkpoint

    ckpt = save_checkpoint(
        out, run.step, model=run.model, ema_state=run.ema_state,
        train_state={"imported_from": run.meta["imported"]["source"]}, meta=run.meta,
        keep_last=1,
    )  # fmt: skip
    run.tokenizer.save(out / "tokenizer")
    save_config(run.config, out / "config.yaml")
    return ckpt


def run(args) -> int:
    from xdlm.importing import ImportOptions

    opts = ImportOptions(
        k=args.k, n_heads=args.n_heads, time_input=args.time_input, tokenizer=args.tokenizer,
        tokenizer_source=args.tokenizer_source, seq_len=args.seq_len, file=args.file,
        revision=args.revision,
    )  # fmt: skip
    ckpt = import_checkpoint(args.source, args.out, opts)
    print(f"imported {args.source} -> {ckpt}")
    return 0
