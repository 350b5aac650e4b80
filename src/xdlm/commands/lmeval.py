"""`xdlm lm-eval`: lm-eval's own command line with the "xdlm" model registered.

    xdlm lm-eval --model xdlm --tasks hellaswag --batch_size 8 --device cuda \\
        --model_args pretrained=GSAI-ML/LLaDA-8B-Base,trust_remote_code=True,k=0.1
    xdlm lm-eval ls tasks                                   # any lm-eval subcommand

Every argument after `lm-eval` goes to lm-eval unchanged (see `lm-eval --help`), plus
`--device cuda` when a GPU is visible, else `--device cpu`, when an evaluation run names no
device (lm-eval's own default is cuda:0, even on a CPU-only torch); the model arguments are
those of `xdlm.eval.lm_eval_adapter.XDLMHarnessLM`, whose `pretrained=` may be an HF backbone
or one of our run / export directories. Remote code is trusted only from this command line
(`trust_remote_code=True` in `--model_args`, or `--trust_remote_code`): an lm-eval `--config
FILE` that sets it is refused (docs/security.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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

    _refuse_trust_from_a_file(args.extra)

    argv = sys.argv
    sys.argv = ["lm-eval", *with_device(args.extra)]
    try:
        cli_evaluate()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        sys.argv = argv
    return 0


def _refuse_trust_from_a_file(argv: list[str]) -> None:
    """ValueError when lm-eval's `--config FILE` (`-C`) sets trust_remote_code (at its top level
    or in its model_args) and this command line does not."""
    import yaml

    path = _option_value(argv, ("--config", "-C"))
    if path is None or not Path(path).is_file():
        return  # no file, or lm-eval names the missing one itself
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        return
    model_args = data.get("model_args") or {}
    if isinstance(model_args, str):
        model_args = dict(kv.partition("=")[::2] for kv in model_args.split(","))
    if not isinstance(model_args, dict):
        model_args = {}
    wanted = [data.get("trust_remote_code"), model_args.get("trust_remote_code")]
    if not any(str(v).strip().lower() not in ("", "none", "false", "0") for v in wanted):
        return
    given = _option_value(argv, ("--model_args",)) or ""
    if "--trust_remote_code" in argv or "trust_remote_code=true" in given.lower():
        return
    raise ValueError(
        f"{path} sets trust_remote_code: a config file never lets a model's code run; pass "
        "trust_remote_code=True in --model_args (or --trust_remote_code) on the command line "
        "(only for code you trust)"
    )


def _option_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The value of the last `--name VALUE` / `--name=VALUE` in `argv`, or None."""
    value = None
    for i, arg in enumerate(argv):
        name, eq, inline = arg.partition("=")
        if name in names:
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def with_device(extra: list[str]) -> list[str]:
    """lm-eval's arguments, plus `--device auto-resolved` for an evaluation run that names none
    (`ls`, `validate` and help take no device; a `--config FILE` may name it)."""
    if not extra or extra[0] in ("ls", "validate", "-h", "--help"):
        return extra
    if _option_value(extra, ("--device", "--config", "-C")) is not None:
        return extra
    from xdlm.builders import build_device

    return [*extra, "--device", build_device("auto")]
