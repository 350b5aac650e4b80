"""The k trade-off on a known data law: NELBO as a gap to the true entropy, samples scored exactly.

    python experiments/knownlaw/run.py --budget cpu              # data, 9 models, eval, report
    python experiments/knownlaw/run.py --budget cpu --jobs 2     # 2 single-thread workers
    python experiments/knownlaw/run.py --budget smoke --out /tmp/kl --publish /tmp/kl  # tests

The data law is a topic hidden Markov model (`xdlm.data.synthetic.topic_hmm`) whose likelihood
log p(x) is exact (forward algorithm). Stages (each skips work already done in `--out`, so a
stopped run resumes where it was):
  data    draw the train / valid sequences from the law once; estimate its entropy
          H = E[−log p(x)]/L by Monte Carlo (with SE) and score law samples as the reference;
  train   one model per (k, seed) through `xdlm.train.loop.train` (checkpoints under
          <out>/runs/k<k>-s<seed>, re-evaluable with `xdlm eval`), identical except kernel.k
          (and kernel.use_mask=false for k = 1) and train.seed;
  eval    per model: the NELBO on the first validation rows and its per-sequence gap to the exact
          −log p(x); samples at every T, scored with the exact −log p(x)/L beside their entropy;
  report  stats over seeds (95 % t-intervals, paired differences vs k = 0), raw JSON, table and
          plot, and the `## Known law` section of docs/results.md (`report.py`).

Every setting lives in `knownlaw.yaml` (fixed before any result was seen).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from xdlm.builders import build_sampler
from xdlm.config import SampleConfig
from xdlm.data.loader import TokenShards
from xdlm.data.synthetic import HiddenMarkovLaw, load_law, topic_hmm, write_dataset
from xdlm.eval.genquality import unigram_entropy
from xdlm.eval.likelihood import sequence_bounds, shard_batches, summarize
from xdlm.eval.sweep import SamplingSetting, generate_many
from xdlm.runs import load_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/seedgrid.py
from seedgrid import (  # noqa: E402
    budget_grid,
    budget_spec,
    finished_models,
    model_config,
    models,
    parse_args,
    run_name,
    run_stages,
    train_model,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STAGES = ("data", "train", "eval", "report")
# Sampler fixed before any result (as in experiments/tradeoff): ancestral posterior steps on the
# t grid, temperature 1, no top-k/top-p, ancestral noise-removal final step.
PLAN = build_sampler(SampleConfig(sampler="ancestral", final="ancestral", grid="t", t_end=1e-5))
SAMPLER = {"sampler": PLAN.sampler, "final": PLAN.final, "grid": PLAN.grid}


def load_settings(path: Path = HERE / "knownlaw.yaml") -> dict:
    return yaml.safe_load(path.read_text())


def per_token(nll: torch.Tensor, length: int) -> dict:
    """Mean and SE over sequences of −log p(x)/L, from nll (N,) nats per sequence."""
    v = nll.double() / length
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "se": se, "n": len(v)}


def law_reference(law: HiddenMarkovLaw, spec: dict, length: int) -> dict:
    """The law's entropy H (Monte Carlo) and its own samples scored like the models' samples."""
    ent = spec["entropy"]
    h = law.entropy(length, ent["sequences"], torch.Generator().manual_seed(ent["seed"]))
    ev = spec["eval"]
    x = law.sample(ev["num_samples"], length, torch.Generator().manual_seed(ev["seed"]))
    return {
        "entropy": {"mean": h.mean, "se": h.se, "n": h.samples},
        "samples": {
            "law_nll": per_token(-law.log_prob(x), length),
            "unigram_entropy": unigram_entropy(x.tolist()),
        },  # fmt: skip
        "unigram_entropy_marginal": _marginal_entropy(x, law.num_tokens),
    }


def _marginal_entropy(x: torch.Tensor, vocab: int) -> float:
    p = torch.bincount(x.flatten(), minlength=vocab).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def prepare_data(settings: dict, budget: str, out: Path) -> Path:
    """Draw the dataset and write the law's reference numbers once per `out`."""
    data_dir, spec = out / "data", budget_spec(settings, budget)
    seq_len = model_config(settings, budget, 0.0, 0, data_dir).data.seq_len
    if not (data_dir / "manifest.json").is_file():
        d = spec["data"]
        rows = {"train": d["train_rows"], "valid": d["valid_rows"]}
        write_dataset(topic_hmm(**settings["law"]), data_dir, seq_len, rows, d["seed"])
    ref = out / "law_reference.json"
    if not ref.is_file():
        ref.write_text(json.dumps(law_reference(load_law(data_dir), spec, seq_len), indent=1))
    return data_dir


def likelihood(loaded, data_dir: Path, law: HiddenMarkovLaw, ev: dict) -> dict:
    """NELBO (nats/token, delta-method SE) on the first `valid_rows` rows and its gap to the
    exact −log p(x) of the same rows: mean over sequences of (NELBO(x) + log p(x))/L with SE."""
    shards = TokenShards(data_dir, "valid")
    n = min(ev["valid_rows"], len(shards))
    batches = shard_batches(shards, ev["sample_batch"], n)
    seq = sequence_bounds(loaded.model, loaded.kernel, loaded.schedule, batches,
                          seed=ev["seed"], t_samples=ev["t_samples"])  # fmt: skip
    x = shards.rows(torch.arange(n)).tokens
    nll = -law.log_prob(x)
    return {
        "nelbo": summarize(seq.nats, seq.tokens).to_dict(),
        "law_nll": per_token(nll, x.shape[1]),
        "gap": per_token(seq.nats - nll, x.shape[1]),
    }


def sample_rows(loaded, law: HiddenMarkovLaw, ev: dict) -> list[dict]:
    """Per T: samples scored by the law (−log p(x)/L) and their unigram entropy. A sample with
    an id outside the law (k = 1 models have the unused mask id as a token) is counted invalid."""
    seq_len, rows = loaded.config.data.seq_len, []
    for steps in ev["steps"]:
        tokens, nfe, wall = generate_many(
            loaded.model, loaded.kernel, loaded.schedule, num_samples=ev["num_samples"],
            seq_len=seq_len, steps=steps, setting=SamplingSetting(), batch_size=ev["sample_batch"],
            seed=ev["seed"], **SAMPLER,
        )  # fmt: skip
        ok = (tokens < law.num_tokens).all(-1)
        valid = tokens[ok]
        rows.append({
            "steps": steps, "nfe": nfe, "wall_s": wall, "invalid": int((~ok).sum()),
            "law_nll": per_token(-law.log_prob(valid), seq_len) if len(valid) else None,
            "unigram_entropy": unigram_entropy(valid.tolist()),
            "marginal_entropy": _marginal_entropy(valid, law.num_tokens) if len(valid) else None,
        })  # fmt: skip
    return rows


def evaluate_model(run_dir: Path, data_dir: Path, ev: dict) -> dict:
    """Likelihood and samples of one trained model, cached in <run_dir>/eval.json."""
    path = run_dir / "eval.json"
    if not path.is_file():
        start, law = time.perf_counter(), load_law(data_dir)
        loaded = load_run(run_dir)
        result = {"step": loaded.step, "likelihood": likelihood(loaded, data_dir, law, ev)}
        result["samples"] = sample_rows(loaded, law, ev)
        result["eval_wall_s"] = time.perf_counter() - start
        path.write_text(json.dumps(result, indent=1))
    return json.loads(path.read_text())


def work(settings: dict, budget: str, out: Path, stages: list[str], share: tuple[int, int]):
    """Train and/or evaluate the models of worker `share` = (i, n): every n-th from the i-th."""
    data_dir, ev = out / "data", budget_spec(settings, budget)["eval"]
    for k, seed in models(settings)[share[0] :: share[1]]:
        run_dir = out / "runs" / run_name(k, seed)
        if "train" in stages:
            train_model(model_config(settings, budget, k, seed, data_dir), run_dir)
        if "eval" in stages and (run_dir / "train_info.json").is_file():
            evaluate_model(run_dir, data_dir, ev)
            print(f"evaluated {run_dir.name}", flush=True)


def collect(settings: dict, out: Path) -> dict:
    """Every finished model's train info and evaluation, with the law reference."""
    reference = json.loads((out / "law_reference.json").read_text())
    return {"reference": reference, "models": finished_models(settings, out)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__, "knownlaw", "cpu", STAGES)
    settings = budget_grid(load_settings(), args.budget)
    return run_stages(
        __file__, args, settings, lambda: prepare_data(settings, args.budget, args.out), work,
        lambda: collect(settings, args.out),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
