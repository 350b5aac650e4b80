"""`xdlm verify`: check prepared datasets in full against their manifests.

    xdlm verify runs/data/austen                  # sizes, SHA-256, every id < V, tokenizer

Every split's file size and SHA-256, every id against vocab_size, the lengths / labels files,
and the saved tokenizer against the fingerprint recorded at preparation. Loading data for
training or evaluation runs the cheap subset of these checks always (docs/security.md).
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check prepared datasets (checksums, id ranges, tokenizer)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", nargs="+", help="prepared dataset directories (xdlm prepare --out)")
    p.set_defaults(func=run)


def run(args) -> int:
    from xdlm.data.integrity import verify_dataset

    for directory in args.data:
        m = verify_dataset(directory)
        rows = ", ".join(f"{name} {info.rows} rows" for name, info in m.splits.items())
        print(f"{directory}: OK ({rows}; vocab_size {m.vocab_size}; checksums and ids checked)")
    return 0
