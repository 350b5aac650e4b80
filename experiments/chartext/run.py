"""Character-level text (text8-style Wikipedia leads): bits per character and samples, over k
and seeds, as one command.

    python experiments/chartext/run.py --budget cpu-small --jobs 2
    python experiments/chartext/run.py --budget smoke --out /tmp/ct --publish /tmp/ct  # tests

Stages (each skips work already done in `--out`, so a stopped run resumes):
  data    normalise the Wikipedia leads the text8 way and prepare them (char tokenizer, L = 256);
  train   one model per (k, seed) with `xdlm.train.loop.train` (<out>/runs/k<k>-s<seed>);
  eval    validation NELBO in bits per token (the ids are characters plus one BOS and one EOS
          per document) with its SE; samples at every T scored by the SmolLM2 gen-PPL beside
          their unigram entropy (`xdlm.eval.genquality.sample_quality`);
  report  95 % t-intervals over seeds, paired differences vs k = 0, raw JSON, table, plot and
          the `## Character-level text` section of docs/results.md.
Settings: chartext.yaml (fixed before any result).
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import time
from pathlib import Path

import yaml

from xdlm.builders import build_sampler
from xdlm.config import SampleConfig
from xdlm.data.documents import read_documents
from xdlm.data.prepare import prepare
from xdlm.eval.genquality import load_scorer
from xdlm.eval.likelihood import evaluate_split
from xdlm.eval.sweep import SamplingSetting, sweep
from xdlm.runs import load_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/seedgrid.py
from seedgrid import (  # noqa: E402
    budget_grid,
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
TEXT = REPO.parent / "shared" / "data" / "text"
STAGES = ("data", "train", "eval", "report")
PLAN = build_sampler(SampleConfig(sampler="ancestral", final="ancestral", grid="t", t_end=1e-5))
SAMPLER = {"sampler": PLAN.sampler, "final": PLAN.final, "grid": PLAN.grid}
NON_LETTERS = re.compile(r"[^a-z]+")


def text8_normalise(text: str) -> str:
    """Lowercase; every run of characters outside a-z becomes one space (text8's alphabet)."""
    return NON_LETTERS.sub(" ", text.lower()).strip()


def load_settings(path: Path = HERE / "chartext.yaml") -> dict:
    return yaml.safe_load(path.read_text())


def prepare_data(settings: dict, budget: str, out: Path) -> Path:
    """Normalised documents (.txt.gz, blank-line separated) prepared once per `out`."""
    data_dir = out / "data"
    if (data_dir / "manifest.json").is_file():
        return data_dir
    src = TEXT / settings["source"]
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing; the experiment needs ../shared/data/text")
    docs = [d for d in (text8_normalise(doc) for doc in read_documents(src)) if d]
    norm = out / "sources" / "wiki_text8.txt.gz"
    norm.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(norm, "wt", encoding="utf-8") as fh:
        fh.write("\n\n".join(docs) + "\n")
    cfg = model_config(settings, budget, 0.0, 0, data_dir).data
    prepare(norm, data_dir, tokenizer="char", seq_len=cfg.seq_len, mode=cfg.mode,
            valid_fraction=settings["valid_fraction"], seed=0)  # fmt: skip
    return data_dir


def evaluate_model(run_dir: Path, data_dir: Path, ev: dict, scorer) -> dict:
    """Validation NELBO (bits/token with SE) and the sample sweep, cached in eval.json."""
    path = run_dir / "eval.json"
    if not path.is_file():
        start, loaded = time.perf_counter(), load_run(run_dir)
        m, kern, sched = loaded.model, loaded.kernel, loaded.schedule
        valid = evaluate_split(m, kern, sched, data_dir, "valid", batch_size=ev["sample_batch"],
                               max_batches=-(-ev["valid_rows"] // ev["sample_batch"]),
                               seed=ev["seed"], t_samples=ev["t_samples"])  # fmt: skip
        rows = sweep(m, kern, sched, loaded.tokenizer, scorer, steps=ev["steps"],
                     settings=(SamplingSetting(1.0, None),), num_samples=ev["num_samples"],
                     seq_len=loaded.config.data.seq_len, batch_size=ev["sample_batch"],
                     seed=ev["seed"], **SAMPLER)  # fmt: skip
        result = {"step": loaded.step, "valid": valid.to_dict(), "samples": rows,
                  "eval_wall_s": time.perf_counter() - start}  # fmt: skip
        path.write_text(json.dumps(result, indent=1))
    return json.loads(path.read_text())


def work(settings: dict, budget: str, out: Path, stages: list[str], share: tuple[int, int]):
    """Train and/or evaluate every share[1]-th model from the share[0]-th."""
    data_dir, ev = out / "data", settings["budgets"][budget]["eval"]
    scorer = None  # loaded when the first model is evaluated (not before training)
    for k, seed in models(settings)[share[0] :: share[1]]:
        run_dir = out / "runs" / run_name(k, seed)
        if "train" in stages:
            train_model(model_config(settings, budget, k, seed, data_dir), run_dir)
        if "eval" in stages and (run_dir / "train_info.json").is_file():
            if scorer is None and not (run_dir / "eval.json").is_file():
                scorer = load_scorer("smollm2")
            evaluate_model(run_dir, data_dir, ev, scorer)
            print(f"evaluated {run_dir.name}", flush=True)


def collect(settings: dict, out: Path) -> dict:
    """Every finished model's train info and evaluation."""
    return {"models": finished_models(settings, out)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__, "chartext", "cpu-small", STAGES)
    settings = budget_grid(load_settings(), args.budget)
    return run_stages(
        __file__, args, settings, lambda: prepare_data(settings, args.budget, args.out), work,
        lambda: collect(settings, args.out),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
