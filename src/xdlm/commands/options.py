"""The config options every inference command shares: `--config`, `--set` and shorthand flags.

A shorthand flag is an argparse option whose `dest` is a config key ("sample.steps") and whose
default is `argparse.SUPPRESS`, so only the flags the user typed reach the config; the defaults
live in `xdlm.config` alone. Precedence: the run's saved config < `--config FILE` < flags <
`--set KEY=VALUE`.
"""

from __future__ import annotations

import argparse

from xdlm.config import XDLMConfig, inference_config


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
    """The run's saved config with `--config`, the shorthand flags and `--set` applied."""
    from xdlm import runs

    return inference_config(
        runs.read_run_config(args.ckpt), args.config, args.overrides, flag_values(args)
    )
