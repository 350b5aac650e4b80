"""`xdlm train`: train an MDLM / XDLM / UDLM denoiser (k = kernel.k).

    xdlm train --config configs/quickstart.yaml --out runs/quickstart
    xdlm train --out runs/quickstart --resume                       # the run's own settings
    xdlm train --out runs/quickstart --resume --set train.steps=1000       # ... changing one
    xdlm train --config configs/quickstart.yaml --out runs/mdlm --set kernel.k=0
    torchrun --nproc_per_node 2 -m xdlm train --config ... --out ... --set dist.strategy=ddp

The config: the schema's defaults < `--config FILE` < `--set KEY=VALUE`. `--resume` starts
instead from the run's saved config (its latest checkpoint's; config.yaml before the first one),
applies only what you pass, prints each change, and never rewrites config.yaml. A `--set
data.path=DIR` must name a prepared dataset unless `--set data.sources=...` says what to prepare.

A model that runs Python code of its own (an HF backbone with configuration_*.py /
modeling_*.py, e.g. LLaDA) trains only with `--trust-remote-code` on this command line; a recipe
or the resumed run saying `model.trust_remote_code: true` does not grant it.

Prints samples from the trained model at the end, with the config's `sample` section (the same
settings `xdlm sample --ckpt RUN_DIR` starts from; sample.num_samples=0 turns them off).
"""

from __future__ import annotations

import argparse

from xdlm.commands.options import add_trust_argument


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
    add_trust_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from xdlm.train.loop import train

    cfg = _config(args)
    result = train(cfg, args.out, resume=args.resume)
    if not _is_main():  # under torchrun only rank 0 reports and samples
        return 130 if result.interrupted else 0
    if result.start_step == result.step and not result.interrupted:
        print(
            f"{result.run_dir} is finished: it is at step {result.step} and train.steps is "
            f"{cfg.train.steps}; to train further: xdlm train --out {args.out} --resume --set "
            f"train.steps=N (N > {result.step})"
        )
        return 0
    print(f"trained to step {result.step} at {result.tokens_per_s:,.0f} tokens/s; "
          f"{_last_loss(result)}; run dir {result.run_dir}")  # fmt: skip
    if result.valid:
        print(
            f"validation NELBO {result.valid['valid_nats_per_token']:.4f} ± "
            f"{result.valid['valid_se_nats_per_token']:.4f} nats/token (SE, first "
            f"{result.valid['valid_rows']} valid rows), PPL <= {result.valid['valid_ppl']:.2f}"
        )
    if result.interrupted:
        return 130
    if not args.no_samples and cfg.sample.num_samples > 0:
        _print_samples(args.out, cfg)
    return 0


def _last_loss(result) -> str:
    """The last finite loss and its step, with the skipped non-finite steps counted."""
    if result.last_loss is None:
        text = "no finite loss"
    else:
        text = f"last loss {result.last_loss:.4f} (step {result.last_loss_step})"
    if result.nan_steps:
        text += f"; {result.nan_steps} steps had a non-finite loss and were skipped"
    return text


def _config(args):
    """The run's config: a new one from the recipe, or the saved one plus the user's changes."""
    from pathlib import Path

    from xdlm.builders import grant_remote_code as grant
    from xdlm.config import XDLMConfig, apply_file, apply_overrides, config_changes
    from xdlm.runs import latest_config

    trust = args.trust_remote_code  # checked at each source of the config
    base = latest_config(args.out, trust) if args.resume else XDLMConfig()
    cfg = grant(apply_file(base, args.config), trust, args.config or "the config")
    cfg = grant(apply_overrides(cfg, args.overrides), trust, "--set")
    if args.resume and _is_main():
        changes = config_changes(base, cfg)
        for key, (old, new) in changes.items():
            print(f"resume: {key}: {old!r} -> {new!r}")
        print(f"resume: the run's saved config{' with these changes' if changes else ''}")
    explicit = {item.partition("=")[0].strip() for item in args.overrides}
    manifest = Path(cfg.data.path) / "manifest.json"
    if "data.path" in explicit and "data.sources" not in explicit and not manifest.is_file():
        raise FileNotFoundError(
            f"data.path={cfg.data.path} holds no prepared dataset (no manifest.json); prepare "
            "it first (xdlm prepare SOURCES --out DIR) or also set data.sources=[...] to "
            "prepare it there (the recipe's own sources are not used for an explicit path)"
        )
    return cfg


def _is_main() -> bool:
    """Rank 0 of a torchrun job, or a plain single process."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _print_samples(run_dir: str, cfg) -> None:
    from xdlm.commands.sample import sample_from_run

    sample_from_run(run_dir, cfg.sample, trust_remote_code=cfg.model.trust_remote_code)
