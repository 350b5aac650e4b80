"""`xdlm export`: a run as a self-describing Hugging Face repo (safetensors, config, card).

xdlm export runs/xdlm hub/xdlm-austen                      # weights, config.json, card
xdlm export runs/xdlm hub/xdlm-austen --push-to-hub me/xdlm-austen    # and upload (online)
xdlm sample --ckpt hub/xdlm-austen --steps 32              # or --ckpt me/xdlm-austen
"""

from __future__ import annotations

import argparse

from xdlm.commands.options import add_trust_argument


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run as a Hugging Face repo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run directory (latest checkpoint) or checkpoint dir")
    p.add_argument("out", metavar="DIR", help="directory to write")
    p.add_argument("--no-ema", action="store_true", help="export the raw (non-EMA) weights")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to REPO")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    add_trust_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from xdlm.hub import export_run, push_to_hub

    out = export_run(
        args.run, args.out, use_ema=not args.no_ema, overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code, hub_id=args.push_to_hub,
    )  # fmt: skip
    print(f"exported {args.run} -> {out}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, private=args.private)}")
    return 0
