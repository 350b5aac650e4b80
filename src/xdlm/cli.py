"""`xdlm` command line: thin wrappers, one module per command in `xdlm.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func=run` (a function of the parsed args returning an exit code). A module named after a Python
keyword carries a trailing underscore (`import_` registers `xdlm import`).

    xdlm prepare ...   text -> token shards          xdlm train --config FILE --out RUN_DIR
    xdlm sample ...    few-step generation           xdlm eval ...   likelihood / gen quality
    xdlm import SOURCE --out RUN_DIR   a released MDLM / UDLM / XDLM checkpoint as a run
    xdlm reproduce zero-shot|gen-ppl|llada ...   a paper's evaluation beside its number
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "prepare", "train", "sample", "eval", "export", "plot", "lmeval", "consolidate", "images",
    "verify", "import_", "reproduce", "distill",
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"xdlm.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"xdlm.commands.{name}":
                raise
            continue  # command not installed in this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:  # user errors; failed writes (disk full), locks held
        print(f"xdlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
