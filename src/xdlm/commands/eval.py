"""`xdlm eval`: likelihood bounds, zero-shot likelihood and generation quality of a checkpoint.

    xdlm eval --ckpt runs/quickstart                       # likelihood on the run's own valid split
    xdlm eval --ckpt runs/quickstart --data runs/data/austen --t-samples 8 --out eval.json
    xdlm eval --ckpt runs/quickstart --data runs/data/austen --quadrature --discrete-T 16 128
    xdlm eval --ckpt runs/quickstart --zero-shot ../shared/data/text/kjv.txt.gz hf:ptb_text_only
    xdlm eval --ckpt runs/quickstart --gen-ppl --steps 8 32 128 --top-p 1.0 0.9 --plot sweep.png

Settings: the `eval` section of the config schema (`xdlm.config.EvalConfig`) from the command
line and the schema's defaults (a run's saved `eval` section is never used, `xdlm.invocation`);
each flag is a shorthand for one key (`--help` shows it), `--config FILE` and `--set
eval.KEY=VALUE` work as in `xdlm train`; `--trust-remote-code` as in `xdlm sample`. Generation
(`--gen-ppl`) uses the `sample` section's sampler, final step and grid; its steps / temperature /
top-p come from the sweep lists.
Progress bars go to stderr.

The model is loaded with its EMA weights (`--no-ema` for the raw ones). Every run writes one JSON
(`--out`, default RUN_DIR/eval.json) with the checkpoint, data, settings, seed and library
version next to the results; docs/evaluation.md defines every estimator.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xdlm.commands.options import (
    add_config_arguments,
    add_trust_argument,
    command_config,
    shorthand,
)
from xdlm.config import EvalConfig, choices
from xdlm.precision import inference_precision


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="likelihood / zero-shot / generation quality of a checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    p.add_argument("--out", default=None, help="JSON file (default: RUN_DIR/eval.json)")
    add_config_arguments(p, "eval (and sample)")
    add_trust_argument(p)
    E = "eval."
    shorthand(p, "--seed", key=E + "seed", type=int)
    shorthand(p, "--device", key=E + "device", help="auto, cpu, cuda ...")
    shorthand(p, "--batch-size", key=E + "batch_size", type=int)
    shorthand(p, "--no-ema", key=E + "use_ema", action="store_false", help="raw weights")
    shorthand(p, "--precision", key=E + "precision", choices=choices(EvalConfig, "precision"))
    g = p.add_argument_group("likelihood")
    shorthand(g, "--data", key=E + "data", help="prepared dataset directory (xdlm prepare)")
    shorthand(g, "--split", key=E + "split")
    shorthand(g, "--t-samples", key=E + "t_samples", type=int, help="t nodes per sequence")
    shorthand(g, "--quadrature", key=E + "quadrature", nargs="?", const="gauss-legendre",
              choices=choices(EvalConfig, "quadrature"),
              help="fixed t grid instead of stratified sampling")  # fmt: skip
    shorthand(g, "--discrete-T", key=E + "discrete_T", type=int, nargs="+", metavar="T",
              help="also the discrete-time bound with T steps")  # fmt: skip
    shorthand(g, "--max-batches", key=E + "max_batches", type=int)
    z = p.add_argument_group("zero-shot")
    shorthand(z, "--zero-shot", key=E + "zero_shot", nargs="+", metavar="FILE_OR_HF")
    shorthand(z, "--mode", key=E + "mode", choices=choices(EvalConfig, "mode"))
    shorthand(z, "--seq-len", key=E + "seq_len", type=int, help="default: the training seq_len")
    shorthand(z, "--max-tokens", key=E + "max_tokens", type=int, help="per corpus")
    q = p.add_argument_group("generation quality")
    shorthand(q, "--gen-ppl", key=E + "gen_ppl", action="store_true")
    shorthand(q, "--scorer", key=E + "scorer", help="'smollm2', a HF name or a local dir")
    shorthand(q, "--steps", key=E + "steps", type=int, nargs="+")
    shorthand(q, "--temperature", key=E + "temperature", type=float, nargs="+")
    shorthand(q, "--top-p", key=E + "top_p", type=float, nargs="+", help="1.0 = off")
    shorthand(q, "--num-samples", key=E + "num_samples", type=int)
    shorthand(q, "--sample-len", key=E + "sample_len", type=int, help="default: training seq_len")
    shorthand(q, "--plot", key=E + "plot", help="PNG of gen-PPL vs entropy")
    p.set_defaults(func=run)


def run(args) -> int:
    import xdlm
    from xdlm import runs
    from xdlm.builders import build_device

    cfg = command_config(args)
    ev = cfg.eval
    if not (ev.data or ev.zero_shot or ev.gen_ppl):
        ev.data = _own_data(cfg.data.path, ev.split, args.ckpt)
    device = build_device(ev.device)
    scorer = _scorer(ev, device)  # before any other work: a missing package fails in seconds
    loaded = runs.load_run(
        args.ckpt, device=device, use_ema=ev.use_ema, trust_remote_code=args.trust_remote_code
    )
    report = {
        "xdlm_version": xdlm.__version__,
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "seed": ev.seed,
        "ema": ev.use_ema,
        "kernel": loaded.kernel.spec(),
    }
    precision = inference_precision(
        ev.precision,
        device,
        loaded.model,
        ev.batch_size,
        loaded.config.data.seq_len,
        loaded.kernel.vocab_size,
    )
    report["precision"] = precision.name
    with precision.autocast(device):
        if ev.data:
            report["likelihood"] = _likelihood(ev, loaded)
        if ev.zero_shot:
            report["zero_shot"] = _zero_shot(ev, loaded, args.ckpt)
        if ev.gen_ppl:
            report["generation"] = _generation(cfg, loaded, args.ckpt, device, scorer)
    out = Path(args.out) if args.out else Path(args.ckpt) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def _own_data(path: str, split: str, ckpt) -> str:
    """The run's training data directory (`data.path`), when it holds `split` here."""
    from xdlm.data.manifest import load_manifest

    manifest = Path(path) / "manifest.json" if path else None
    if manifest is None or not manifest.is_file():
        raise ValueError(
            f"nothing to evaluate: {ckpt} was trained on data.path={path!r}, which is not a "
            "prepared dataset here; pass --data, --zero-shot and/or --gen-ppl"
        )
    if split not in load_manifest(path).splits:
        raise ValueError(f"{path} has no {split!r} split; pass --data or --split")
    return path


def _bound_kwargs(ev: EvalConfig, loaded) -> dict:
    return {
        "seed": ev.seed,
        "t_samples": ev.t_samples,
        "method": ev.quadrature or "stratified",
        "t_min": loaded.config.train.t_min,
    }


def _likelihood(ev: EvalConfig, loaded) -> dict:
    from xdlm.data.integrity import check_same_tokenizer
    from xdlm.eval.likelihood import evaluate_split

    check_same_tokenizer(loaded.tokenizer, ev.data, f"the run {loaded.checkpoint.parent.parent}")
    kw = _bound_kwargs(ev, loaded)
    common = dict(batch_size=ev.batch_size, max_batches=ev.max_batches)
    m = (loaded.model, loaded.kernel, loaded.schedule, ev.data, ev.split)
    out = {"data": str(ev.data), "split": ev.split, **common, "settings": kw}
    out["continuous"] = evaluate_split(*m, **common, **kw, progress="NELBO").to_dict()
    out["discrete"] = {
        str(T): evaluate_split(
            *m, **common, discrete_steps=T, seed=ev.seed, progress=f"discrete T={T}"
        ).to_dict()
        for T in ev.discrete_T
    }
    return out


def _zero_shot(ev: EvalConfig, loaded, ckpt) -> dict:
    from xdlm.eval.zeroshot import zero_shot

    if loaded.tokenizer is None:
        raise ValueError(f"{ckpt} has no tokenizer/ directory; zero-shot needs the tokenizer")
    kw = _bound_kwargs(ev, loaded)
    seq_len = ev.seq_len or loaded.config.data.seq_len
    results = zero_shot(
        loaded.model, loaded.kernel, loaded.schedule, loaded.tokenizer, ev.zero_shot,
        seq_len=seq_len, mode=ev.mode, max_tokens=ev.max_tokens,
        batch_size=ev.batch_size, progress=True, **kw,
    )  # fmt: skip
    return {"settings": kw, "corpora": results}


def _scorer(ev: EvalConfig, device: str):
    """The gen-PPL scorer (`--gen-ppl`), else None."""
    if not ev.gen_ppl:
        return None
    from xdlm.eval.genquality import load_scorer

    return load_scorer(ev.scorer, device=device)


def _generation(cfg, loaded, ckpt, device: str, scorer) -> dict:
    from xdlm.builders import build_sampler, resolve_sampling
    from xdlm.eval.sweep import SamplingSetting, plot_sweep, sweep

    ev = cfg.eval
    if loaded.tokenizer is None:
        raise ValueError(f"{ckpt} has no tokenizer/ directory; gen-PPL needs the tokenizer")
    settings = [
        SamplingSetting(t, None if p >= 1.0 else p) for t in ev.temperature for p in ev.top_p
    ]
    seq_len = ev.sample_len or loaded.config.data.seq_len
    sampling = resolve_sampling(cfg.sample, cfg.model, loaded.kernel.mask_id)  # the run's model
    plan = build_sampler(sampling)
    rows = sweep(
        loaded.model, loaded.kernel, loaded.schedule, loaded.tokenizer, scorer,
        steps=ev.steps, settings=settings, num_samples=ev.num_samples, seq_len=seq_len,
        batch_size=ev.batch_size, seed=ev.seed, device=device, progress=True,
        sampler=plan.sampler, final=plan.final, grid=plan.grid,
    )  # fmt: skip
    out = {"scorer": ev.scorer, "seq_len": seq_len, "num_samples": ev.num_samples,
           "sampler": sampling.sampler, "final": sampling.final, "grid": sampling.grid,
           "rows": rows}  # fmt: skip
    if ev.plot:
        out["plot"] = str(plot_sweep(rows, ev.plot))
    return out
