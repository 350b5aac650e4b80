"""`xdlm lm-eval`: lm-eval's own command line with the "xdlm" model registered.

    xdlm lm-eval --model xdlm --tasks hellaswag --batch_size 8 --device cuda \\
        --model_args pretrained=GSAI-ML/LLaDA-8B-Base,trust_remote_code=True,k=0.1
    xdlm lm-eval ls tasks                                   # any lm-eval subcommand

Every argument after `lm-eval` goes to lm-eval unchanged (see `lm-eval --help`); the model
arguments are those of `xdlm.eval.lm_eval_adapter.XDLMHarnessLM`.
"""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="run lm-eval's CLI with the xdlm model registered",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,  # --help belongs to lm-eval
    )
    p.set_defaults(func=run, passthrough=True)


def run(args) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        raise ValueError("xdlm lm-eval needs lm-eval: pip install 'xdlm[eval]'") from err
    import xdlm.eval.lm_eval_adapter  # noqa: F401  (registers "xdlm")

    argv = sys.argv
    sys.argv = ["lm-eval", *args.extra]
    try:
        cli_evaluate()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        sys.argv = argv
    return 0
