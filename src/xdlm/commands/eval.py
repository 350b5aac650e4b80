"""`xdlm eval`: likelihood bounds, zero-shot likelihood and generation quality of a checkpoint.

    xdlm eval --ckpt runs/quickstart --data runs/data/austen --t-samples 8 --out eval.json
    xdlm eval --ckpt runs/quickstart --data runs/data/austen --quadrature --discrete-T 16 128
    xdlm eval --ckpt runs/quickstart --zero-shot ../shared/data/text/kjv.txt.gz hf:ptb_text_only
    xdlm eval --ckpt runs/quickstart --gen-ppl --steps 8 32 128 --top-p 1.0 0.9 --plot sweep.png

The model is loaded with its EMA weights (`--no-ema` for the raw ones). Every run writes one JSON
(`--out`, default RUN_DIR/eval.json) with the checkpoint, data, settings, seed and library
version next to the results; docs/evaluation.md defines every estimator.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xdlm.precision import add_precision_argument, inference_precision


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="likelihood / zero-shot / generation quality of a checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    p.add_argument("--out", default=None, help="JSON file (default: RUN_DIR/eval.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw (non-EMA) weights")
    add_precision_argument(p)
    g = p.add_argument_group("likelihood")
    g.add_argument("--data", default=None, help="prepared dataset directory (xdlm prepare)")
    g.add_argument("--split", default="valid")
    g.add_argument("--t-samples", type=int, default=4, help="t nodes per sequence")
    g.add_argument("--quadrature", nargs="?", const="gauss-legendre", default=None,
                   choices=["midpoint", "gauss-legendre"],
                   help="fixed t grid instead of stratified sampling")  # fmt: skip
    g.add_argument("--discrete-T", type=int, nargs="+", default=[], metavar="T",
                   help="also the discrete-time bound with T steps")  # fmt: skip
    g.add_argument("--max-batches", type=int, default=None)
    z = p.add_argument_group("zero-shot")
    z.add_argument("--zero-shot", nargs="+", default=[], metavar="FILE_OR_HF")
    z.add_argument("--mode", default="wrap", choices=["wrap", "pad"])
    z.add_argument("--seq-len", type=int, default=None, help="default: the training seq_len")
    z.add_argument("--max-tokens", type=int, default=None, help="per corpus")
    q = p.add_argument_group("generation quality")
    q.add_argument("--gen-ppl", action="store_true")
    q.add_argument("--scorer", default="smollm2", help="'smollm2', a HF name or a local dir")
    q.add_argument("--steps", type=int, nargs="+", default=[8, 32])
    q.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    q.add_argument("--top-p", type=float, nargs="+", default=[1.0], help="1.0 = off")
    q.add_argument("--num-samples", type=int, default=16)
    q.add_argument("--sample-len", type=int, default=None, help="default: the training seq_len")
    q.add_argument("--plot", default=None, help="PNG of gen-PPL vs entropy")
    p.set_defaults(func=run)


def run(args) -> int:
    import xdlm
    from xdlm.runs import load_run

    if not (args.data or args.zero_shot or args.gen_ppl):
        raise ValueError("nothing to evaluate: pass --data, --zero-shot and/or --gen-ppl")
    loaded = load_run(args.ckpt, device=args.device, use_ema=not args.no_ema)
    report = {
        "xdlm_version": xdlm.__version__,
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "seed": args.seed,
        "ema": not args.no_ema,
        "kernel": loaded.kernel.spec(),
    }
    precision = inference_precision(args.precision, args.device, loaded.model)
    report["precision"] = precision.name
    with precision.autocast(args.device):
        if args.data:
            report["likelihood"] = _likelihood(args, loaded)
        if args.zero_shot:
            report["zero_shot"] = _zero_shot(args, loaded)
        if args.gen_ppl:
            report["generation"] = _generation(args, loaded)
    out = Path(args.out) if args.out else Path(args.ckpt) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def _bound_kwargs(args, loaded) -> dict:
    return {
        "seed": args.seed,
        "t_samples": args.t_samples,
        "method": args.quadrature or "stratified",
        "t_min": loaded.config.train.t_min,
    }


def _likelihood(args, loaded) -> dict:
    from xdlm.eval.likelihood import evaluate_split

    kw = _bound_kwargs(args, loaded)
    common = dict(batch_size=args.batch_size, max_batches=args.max_batches)
    m = (loaded.model, loaded.kernel, loaded.schedule, args.data, args.split)
    out = {"data": str(args.data), "split": args.split, **common, "settings": kw}
    out["continuous"] = evaluate_split(*m, **common, **kw).to_dict()
    out["discrete"] = {
        str(T): evaluate_split(*m, **common, discrete_steps=T, seed=args.seed).to_dict()
        for T in args.discrete_T
    }
    return out


def _zero_shot(args, loaded) -> dict:
    from xdlm.eval.zeroshot import zero_shot

    if loaded.tokenizer is None:
        raise ValueError(f"{args.ckpt} has no tokenizer/ directory; zero-shot needs the tokenizer")
    kw = _bound_kwargs(args, loaded)
    seq_len = args.seq_len or loaded.config.data.seq_len
    results = zero_shot(
        loaded.model, loaded.kernel, loaded.schedule, loaded.tokenizer, args.zero_shot,
        seq_len=seq_len, mode=args.mode, max_tokens=args.max_tokens,
        batch_size=args.batch_size, **kw,
    )  # fmt: skip
    return {"settings": kw, "corpora": results}


def _generation(args, loaded) -> dict:
    from xdlm.eval.genquality import load_scorer
    from xdlm.eval.sweep import SamplingSetting, plot_sweep, sweep

    if loaded.tokenizer is None:
        raise ValueError(f"{args.ckpt} has no tokenizer/ directory; gen-PPL needs the tokenizer")
    settings = [
        SamplingSetting(t, None if p >= 1.0 else p) for t in args.temperature for p in args.top_p
    ]
    seq_len = args.sample_len or loaded.config.data.seq_len
    scorer = load_scorer(args.scorer, device=args.device)
    rows = sweep(
        loaded.model, loaded.kernel, loaded.schedule, loaded.tokenizer, scorer,
        steps=args.steps, settings=settings, num_samples=args.num_samples, seq_len=seq_len,
        batch_size=args.batch_size, seed=args.seed, device=args.device,
    )  # fmt: skip
    out = {"scorer": args.scorer, "seq_len": seq_len, "num_samples": args.num_samples,
           "rows": rows}  # fmt: skip
    if args.plot:
        out["plot"] = str(plot_sweep(rows, args.plot))
    return out
