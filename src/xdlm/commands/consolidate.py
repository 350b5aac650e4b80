"""`xdlm consolidate`: turn a sharded (FSDP / DCP) checkpoint into a single-file one.

    xdlm consolidate runs/big --out runs/big-single                 # the run's latest checkpoint
    xdlm consolidate runs/big/checkpoints/step_0005000 --out runs/big-5k

`--out` becomes a run directory with the layout of a one-process run (config.yaml, tokenizer/,
checkpoints/step_N/{model,ema}.safetensors + state.pt + meta.json, checkpoints/latest), so
`xdlm.runs.load_run`, `xdlm sample` and `xdlm eval` take it as they take any run. One process, no
process group: DCP reshards the saved shards onto the full model. The optimizer state is not
carried over (resume the original run to keep training).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from xdlm.commands.options import add_trust_argument


def register(sub) -> None:
    p = sub.add_parser(
        "consolidate",
        help="FSDP checkpoint -> single-file checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="an FSDP run directory (its latest checkpoint) or step_N dir")
    p.add_argument("--out", required=True, help="new run directory to write")
    add_trust_argument(p)
    p.set_defaults(func=run)


def consolidate(path: str | Path, out: str | Path, trust_remote_code: bool = False) -> Path:
    """Load the sharded checkpoint at `path` into a plain model + EMA and write it under `out`
    as a non-distributed checkpoint; returns the written checkpoint directory.
    `trust_remote_code`: the user's --trust-remote-code (`builders.grant_remote_code`)."""
    from xdlm.builders import build_model, grant_remote_code
    from xdlm.config import config_from_dict
    from xdlm.models.ema import EMA
    from xdlm.runs import find_checkpoint, read_meta
    from xdlm.train.checkpoint import load_sharded_state, save_checkpoint

    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    if not meta.get("sharded"):
        raise ValueError(f"{ckpt} is already a single-file checkpoint (no dcp/); use it directly")
    out = Path(out)
    if (out / "checkpoints").exists():
        raise ValueError(f"{out} already holds checkpoints; choose a new --out")
    cfg = grant_remote_code(config_from_dict(meta["config"]), trust_remote_code, ckpt / "meta.json")
    model = build_model(cfg.model, meta["kernel"]["vocab_size"])
    ema = EMA(model)
    state = load_sharded_state(ckpt, model, None, ema)  # fills model and ema in place
    plain = {k: v for k, v in meta.items() if k not in ("sharded", "world_size", "step")}
    final = save_checkpoint(
        out,
        meta["step"],
        model=model,
        ema_state=ema.state_dict(),
        train_state={"progress": state["progress"]},
        meta=plain,
    )
    run_dir = ckpt.parent.parent
    for name in ("config.yaml", "tokenizer"):
        src = run_dir / name
        if src.is_dir():
            shutil.copytree(src, out / name, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, out / name)
    return final


def run(args) -> int:
    final = consolidate(args.path, args.out, args.trust_remote_code)
    print(f"wrote {final}; load it with load_run({str(Path(args.out))!r}) or xdlm sample")
    return 0
