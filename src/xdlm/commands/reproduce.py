"""`xdlm reproduce`: the papers' evaluations, our number beside the published one.

    xdlm reproduce zero-shot --ckpt runs/mdlm-owt --paper-model MDLM
    xdlm reproduce zero-shot --ckpt RUN --benchmarks ptb --texts ptb=ptb_valid.jsonl --max-rows 8
    xdlm reproduce gen-ppl --ckpt runs/mdlm-owt --steps 8 16 32 64 128 256 512 1024
    xdlm reproduce llada --model Mzero17/LLaDA-XDLM --tasks mbpp --trust-remote-code

zero-shot: PTB, WikiText-2/103, LM1B, LAMBADA, AG News, PubMed, ArXiv, OWT valid under the
upstream rules (xdlm.eval.protocols: detokenisers, wrap without per-document EOS, L = the run's
length, 1024 for the OpenWebText models the papers evaluate zero-shot).
gen-ppl: 800 samples of L = 1024 per T scored by GPT-2 Large under the upstream rules, with the
all-token entropy beside it. llada: lm-eval tasks through the xdlm harness adapter (the paper
used opencompass; prompts differ, see docs/reproduce.md). Published values come from
xdlm/eval/paper_values.yaml with their sources ("n/a" where none is recorded). Each run writes
its results as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xdlm.commands.options import add_trust_argument
from xdlm.eval.protocols import BENCHMARKS, GEN_PPL_SCORER


def register(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run a paper's evaluation and print ours beside the published number",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_subparsers(dest="table", required=True)
    z = which.add_parser("zero-shot", help="zero-shot likelihood (upstream protocol)")
    _common(z)
    z.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    z.add_argument("--texts", nargs="*", default=[], metavar="NAME=FILE",
                   help="documents from a local .txt/.jsonl instead of the Hub")  # fmt: skip
    z.add_argument("--max-rows", type=int, default=None, help="rows per benchmark (smoke runs)")
    z.add_argument("--t-samples", type=int, default=1, help="t per row (upstream: 1)")
    g = which.add_parser("gen-ppl", help="generative perplexity + entropy (upstream protocol)")
    _common(g)
    g.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    g.add_argument("--num-samples", type=int, default=800)
    g.add_argument("--scorer", default=GEN_PPL_SCORER, help="HF causal LM (name or local dir)")
    g.add_argument("--sampler", default="ancestral", choices=["ancestral", "remdm", "confidence"])
    ll = which.add_parser("llada", help="LLaDA / LLaDA-XDLM benchmarks via lm-eval")
    ll.add_argument("--model", required=True, help="Hub id or local HF dir")
    ll.add_argument("--tasks", nargs="+", default=["mbpp"])
    ll.add_argument("--k", type=float, default=0.1)
    ll.add_argument("--steps", type=int, default=32)
    ll.add_argument("--gen-length", type=int, default=256)
    ll.add_argument("--block-length", type=int, default=None)
    ll.add_argument("--limit", type=int, default=None, help="examples per task (smoke runs)")
    for q in (z, g, ll):
        add_trust_argument(q)
        q.add_argument(
            "--paper-model",
            default=None,
            help="row of paper_values.yaml to compare (default: the run's k)",
        )
        q.add_argument("--paper-values", default=None, help="another paper_values.yaml")
        q.add_argument("--out", default=None, metavar="FILE.json")
    ll.add_argument("--device", default="auto", help="auto (cuda if visible, else cpu), cpu, cuda")
    p.set_defaults(func=run)


def _common(q) -> None:
    q.add_argument("--ckpt", required=True, metavar="RUN_DIR", help="e.g. from `xdlm import`")
    q.add_argument("--batch-size", type=int, default=None)
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--device", default="auto", help="auto (cuda if visible, else cpu), cpu, cuda")
    q.add_argument("--seq-len", type=int, default=None, help="default: the run's L (1024 OWT)")


def run(args) -> int:
    from xdlm.builders import build_device
    from xdlm.eval import reproduce as R

    args.device = build_device(args.device)
    if args.table == "llada":
        results = R.llada_table(
            args.model, args.tasks, k=args.k, steps=args.steps, gen_length=args.gen_length,
            block_length=args.block_length, device=args.device, limit=args.limit,
            trust_remote_code=args.trust_remote_code,
        )  # fmt: skip
        ours = {task: _headline(metrics) for task, metrics in results.items()}
        model = args.paper_model or "LLaDA-XDLM"
    else:
        from xdlm.runs import load_run

        loaded = load_run(args.ckpt, args.device, trust_remote_code=args.trust_remote_code)
        results, ours, model = _run_run(R, args, loaded)
    rows = R.comparison(
        ours, args.table.replace("-", "_"), model, R.paper_values(args.paper_values)
    )
    print(R.format_rows(rows, f"{args.table} ({model or 'no paper row chosen'})"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"results": results, "comparison": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


def _run_run(R, args, loaded):
    """zero-shot / gen-ppl on a run directory: (results, {key: our number}, paper model)."""
    seq_len = args.seq_len or loaded.config.data.seq_len
    if args.table == "zero-shot":
        texts = dict(_texts(item) for item in args.texts)
        results = R.zero_shot_table(
            loaded, args.benchmarks, texts=texts, seq_len=seq_len, max_rows=args.max_rows,
            batch_size=args.batch_size or 16, t_samples=args.t_samples, seed=args.seed or 0,
        )  # fmt: skip
        ours = R.with_average({k: v["ppl"] for k, v in results.items()})
        return results, ours, args.paper_model or R.paper_model_for(loaded.kernel.k)
    from xdlm.builders import build_sampler
    from xdlm.config import SampleConfig

    plan = build_sampler(SampleConfig(sampler=args.sampler))
    scorer = R.load_hf_scorer(args.scorer, args.device)
    results = R.gen_ppl_table(
        loaded, args.steps, scorer=scorer, num_samples=args.num_samples,
        batch_size=args.batch_size or 8, seq_len=seq_len, seed=args.seed or 1,
        device=args.device, sampler=plan.sampler, final=plan.final, grid=plan.grid,
    )  # fmt: skip
    ours = {str(t): v["gen_ppl"] for t, v in results.items()}
    return results, ours, args.paper_model or R.paper_model_for(loaded.kernel.k)


def _texts(item: str) -> tuple[str, list[str]]:
    """NAME=FILE -> (NAME, documents of FILE by the xdlm.data.documents rule)."""
    from xdlm.data.documents import read_documents

    name, sep, path = item.partition("=")
    if not sep or name not in BENCHMARKS:
        raise ValueError(f"--texts expects NAME=FILE with NAME in {sorted(BENCHMARKS)}, got {item}")
    return name, read_documents(path)


def _headline(metrics: dict) -> float:
    """The first non-stderr metric of an lm-eval task, in percent."""
    for key, value in metrics.items():
        if "stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return 100.0 * float(value)
    return float("nan")
