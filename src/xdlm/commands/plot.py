"""`xdlm plot`: training and validation curves of one or more runs as a PNG.

xdlm plot runs/mdlm runs/xdlm runs/udlm --out curves.png

Runs trained on different data, tokenizers, vocabulary sizes or sequence lengths are drawn
too, after a one-line warning naming the runs and what differs (their nats/token do not
compare).
"""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="training / validation curves as PNG",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (RUN/metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from xdlm.train.curves import data_mismatch, plot_runs

    mismatch = data_mismatch(args.runs)
    if mismatch:
        print(f"xdlm plot: warning: {mismatch}", file=sys.stderr)
    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0
