"""`xdlm train`: train an MDLM / XDLM / UDLM denoiser (k = kernel.k).

    xdlm train --config configs/quickstart.yaml --out runs/quickstart
    xdlm train --config configs/quickstart.yaml --out runs/quickstart --resume
    xdlm train --config configs/quickstart.yaml --out runs/mdlm --set kernel.k=0
    torchrun --nproc_per_node 2 -m xdlm train --config ... --out ... --set dist.strategy=ddp

Prints samples from the trained model at the end, with the config's `sample` section (the same
settings `xdlm sample --ckpt RUN_DIR` starts from; sample.num_samples=0 turns them off).
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML overrides of the config schema")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, config)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.steps=100 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--no-samples", action="store_true", help="skip the samples printed at the end")
    p.set_defaults(func=run)


def run(args) -> int:
    from xdlm.config import load_config
    from xdlm.train.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, args.out, resume=args.resume)
    if not _is_main():  # under torchrun only rank 0 reports and samples
        return 130 if result.interrupted else 0
    print(
        f"trained to step {result.step} at {result.tokens_per_s:,.0f} tokens/s; "
        f"last loss {result.last_loss}; run dir {result.run_dir}"
    )
    if result.valid:
        print(
            f"validation NELBO {result.valid['valid_nats_per_token']:.4f} nats/token, "
            f"PPL <= {result.valid['valid_ppl']:.2f}"
        )
    if result.interrupted:
        return 130
    if not args.no_samples and cfg.sample.num_samples > 0:
        _print_samples(args.out, cfg)
    return 0


def _is_main() -> bool:
    """Rank 0 of a torchrun job, or a plain single process."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _print_samples(run_dir: str, cfg) -> None:
    from xdlm.commands.sample import sample_from_run

    sample_from_run(run_dir, cfg.sample)
