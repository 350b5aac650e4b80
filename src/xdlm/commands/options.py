"""The config options every inference command shares: `--config`, `--set` and shorthand flags.

A shorthand flag is an argparse option whose `dest` is a config key ("sample.steps") and whose
default is `argparse.SUPPRESS`, so only the flags the user typed reach the config; the defaults
live in `xdlm.config` alone. Precedence: the run's saved config < `--config FILE` < flags <
`--set KEY=VALUE`; the run contributes only what `xdlm.invocation` lets it.

`--trust-remote-code` (`add_trust_argument`) is the one way to let a model run Python code of its
own; every command that loads a run, an export or an HF model takes it.
"""

from __future__ import annotations

import argparse

from xdlm.builders import TRUST_FLAG
from xdlm.config import XDLMConfig
from xdlm.invocation import inference_config


def add_config_arguments(parser: argparse.ArgumentParser, sections: str) -> None:
    """`--config FILE.yaml` and repeatable `--set KEY=VALUE` for the given sections."""
    parser.add_argument(
        "--config", default=None, metavar="FILE.yaml",
        help=f"YAML overrides of the {sections} sections (on top of the run's config.yaml)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override one {sections} setting, e.g. --set sample.steps=8 (repeatable)",
    )  # fmt: skip


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """`--trust-remote-code`: this invocation may run the model's own Python code (an HF model
    with configuration_*.py / modeling_*.py); a run's or export's files never grant it."""
    parser.add_argument(
        TRUST_FLAG, dest="trust_remote_code", action="store_true",
        help="allow the model's own Python code to run (HF models shipping code; only for "
        "sources you trust; a run's saved config never turns this on)",
    )  # fmt: skip


def shorthand(parser, *flags: str, key: str, help: str = "", **kwargs) -> None:
    """A flag that sets config `key` only when given (e.g. `--steps` -> `sample.steps`)."""
    parser.add_argument(
        *flags, dest=key, default=argparse.SUPPRESS, help=f"{help} [{key}]".strip(), **kwargs
    )


def flag_values(args: argparse.Namespace) -> dict:
    """The shorthand flags the user gave, as a nested dict ({"sample": {"steps": 8}})."""
    nested: dict = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            nested.setdefault(section, {})[key] = value
    return nested


def command_config(args: argparse.Namespace) -> XDLMConfig:
    """The run's saved config (less what belongs to the invocation) with `--config`, the
    shorthand flags and `--set` applied."""
    from xdlm import runs

    saved = runs.read_run_config(args.ckpt, args.trust_remote_code)
    return inference_config(saved, args.config, args.overrides, flag_values(args))
