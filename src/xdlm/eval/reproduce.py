"""Run the papers' evaluations on a model and set our numbers beside the published ones.

    zero_shot_table(loaded, ["ptb", "wikitext2"])        -> {benchmark: result}  (eval/protocols)
    gen_ppl_table(loaded, [8, 32, 128], scorer=...)      -> {T: result}
    llada_table("Mzero17/LLaDA-XDLM", ["mbpp"], k=0.1)   -> {task: result}  (lm-eval harness)
    comparison(results, table="zero_shot", model="MDLM") -> rows with ours, paper, diff, source

The published numbers come from `paper_values.yaml` (package data), each with its source; a
missing one prints as "n/a", never as a guess.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import yaml

from xdlm.eval.protocols import (
    GEN_PPL_CONTEXT,
    GEN_PPL_SCORER,
    ZERO_SHOT_L,
    upstream_entropy,
    upstream_gen_ppl,
    zero_shot_upstream,
)

TABLES = ("zero_shot", "gen_ppl", "llada", "images")
# The papers' zero-shot "average": the mean PPL over these sets (paper_values.yaml).
AVERAGE_SETS = ("ptb", "wikitext2", "lm1b", "lambada", "ag_news", "pubmed", "arxiv")


@dataclass(frozen=True)
class PaperValue:
    """One published number: `table`, the model it was reported for, its key (a benchmark, a
    step count T or a task), the value, where it was read and how exactly it is known
    (`precision`, e.g. "figure reading, ±1")."""

    table: str
    model: str
    key: str
    value: float
    source: str
    precision: str


def paper_values(path: str | Path | None = None) -> list[PaperValue]:
    """Every row of `paper_values.yaml` (or of `path`)."""
    text = (
        Path(path).read_text()
        if path
        else (resources.files("xdlm.eval") / "paper_values.yaml").read_text()
    )
    data = yaml.safe_load(text) or {}
    return [
        PaperValue(
            table,
            str(r["model"]),
            str(r["key"]),
            float(r["value"]),
            str(r["source"]),
            str(r["precision"]),
        )  # fmt: skip
        for table in TABLES
        for r in data.get(table) or []
    ]


def paper_model_for(k: float) -> str:
    """The paper_values.yaml model name of a run with uniform share k: MDLM, UDLM, XDLM k=<k>."""
    return {0.0: "MDLM", 1.0: "UDLM"}.get(float(k), f"XDLM k={float(k):g}")


def with_average(ppl: dict[str, float]) -> dict[str, float]:
    """`ppl` per benchmark plus "average" (the mean over AVERAGE_SETS) when all are there."""
    if not set(AVERAGE_SETS) <= set(ppl):
        return dict(ppl)
    return {**ppl, "average": sum(ppl[s] for s in AVERAGE_SETS) / len(AVERAGE_SETS)}


def comparison(
    ours: dict[str, float], table: str, model: str | None, values: Sequence[PaperValue]
) -> list[dict]:
    """One row per key of `ours`: ours, the paper's value for `model` (None if absent), the
    difference ours − paper, the source and its precision."""
    rows = []
    for key, value in ours.items():
        match = next(
            (v for v in values if v.table == table and v.model == model and v.key == str(key)),
            None,
        )
        paper = None if match is None else match.value
        rows.append({"key": str(key), "ours": value, "paper": paper,
                     "diff": None if paper is None else value - paper,
                     "source": None if match is None else match.source,
                     "precision": None if match is None else match.precision})  # fmt: skip
    return rows


def format_rows(rows: Sequence[dict], title: str) -> str:
    """A plain-text table: key | ours | paper | diff, then the sources with their precision."""
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [title, f"{'':14} {'ours':>10} {'paper':>10} {'diff':>10}"]
    lines += [f"{r['key']:14} {fmt(r['ours']):>10} {fmt(r['paper']):>10} {fmt(r['diff']):>10}"
              for r in rows]  # fmt: skip
    sources = sorted({(r["source"], r["precision"]) for r in rows if r["source"]})
    lines += [f"  source: {s} ({p})" for s, p in sources] or [
        "  paper: no published value in the table"
    ]
    return "\n".join(lines)


def zero_shot_table(
    loaded, benchmarks: Sequence[str], *, texts: dict[str, list[str]] | None = None,
    seq_len: int = ZERO_SHOT_L, max_rows: int | None = None, batch_size: int = 16,
    t_samples: int = 1, seed: int = 0,
) -> dict[str, dict]:  # fmt: skip
    """`zero_shot_upstream` on each benchmark with the run's model, kernel and tokenizer."""
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.checkpoint} has no tokenizer; zero-shot needs one")
    return {
        name: zero_shot_upstream(
            loaded.model, loaded.kernel, loaded.schedule, loaded.tokenizer, name,
            texts=(texts or {}).get(name), seq_len=seq_len, max_rows=max_rows,
            batch_size=batch_size, t_samples=t_samples, seed=seed,
            t_min=loaded.config.train.t_min,
        )
        for name in benchmarks
    }  # fmt: skip


def load_hf_scorer(name: str = GEN_PPL_SCORER, device: str = "cpu"):
    """(causal LM, its tokenizer) from the Hub or a local dir, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def gen_ppl_table(
    loaded, steps: Sequence[int], *, scorer, num_samples: int = 800, batch_size: int = 8,
    seq_len: int = ZERO_SHOT_L, seed: int = 1, device: str = "cpu", **sampling,
) -> dict[int, dict]:  # fmt: skip
    """Per T: samples in batches of `batch_size`, each batch scored as upstream scores one
    sample batch (`upstream_gen_ppl`), nats and counts summed; entropy over all samples.
    `sampling` goes to `generate` (sampler, final, grid objects, e.g. from
    `xdlm.builders.build_sampler`; the ancestral sampler and the paper's grid by default)."""
    from xdlm.eval.sweep import SamplingSetting, generate_many

    model, hf_tok = scorer
    cache = not loaded.config.model.time_conditioning
    out = {}
    for T in steps:
        tokens, nfe, wall = generate_many(
            loaded.model, loaded.kernel, loaded.schedule, num_samples=num_samples,
            seq_len=seq_len, steps=T, setting=SamplingSetting(), batch_size=batch_size,
            seed=seed, device=device, cache=cache, **sampling,
        )  # fmt: skip
        nats, count = 0.0, 0
        for batch in tokens.split(batch_size):
            texts = [loaded.tokenizer.decode(row.tolist(), skip_special=False) for row in batch]
            part = upstream_gen_ppl(model, hf_tok, texts, seq_len, batch_size, GEN_PPL_CONTEXT)
            nats, count = nats + part.nats, count + part.tokens
        out[T] = {"gen_ppl": math.exp(nats / count) if count else float("nan"),
                  "entropy": upstream_entropy(tokens), "scored_tokens": count,
                  "samples": len(tokens), "nfe": nfe, "wall_time_s": wall}  # fmt: skip
    return out


def llada_table(
    model: str, tasks: Sequence[str], *, k: float = 0.1, steps: int = 32,
    gen_length: int = 256, block_length: int | None = None, device: str = "cuda",
    dtype: str = "bfloat16", trust_remote_code: bool = False, limit: int | None = None,
) -> dict[str, dict]:  # fmt: skip
    """lm-eval `tasks` on a LLaDA-family model through the xdlm harness adapter."""
    if not trust_remote_code:
        raise ValueError(
            f"{model} is a remote-code model; pass --trust-remote-code to run its code"
        )
    import lm_eval

    import xdlm.eval.lm_eval_adapter  # noqa: F401  (registers the "xdlm" model)

    args = {"pretrained": model, "trust_remote_code": True, "k": k, "steps": steps,
            "gen_length": gen_length, "dtype": dtype}  # fmt: skip
    if block_length is not None:
        args["block_length"] = block_length
    res = lm_eval.simple_evaluate(
        model="xdlm", model_args=",".join(f"{a}={v}" for a, v in args.items()),
        tasks=list(tasks), device=device, limit=limit, confirm_run_unsafe_code=True,
    )  # fmt: skip
    return {task: res["results"].get(task, {}) for task in tasks}
