"""The understanding-vs-generation trade-off over k, as one command.

    python experiments/tradeoff/run.py --budget cpu-short  # train 5 models, evaluate, plot
    python experiments/tradeoff/run.py --budget smoke --out /tmp/tr  # seconds per model (tests)
    python experiments/tradeoff/run.py --budget cpu-short --stages train   # only train

Stages (each skips work already done in `--out`, so a run can be resumed or split):
  data    prepare the training set (BPE on the training documents, L = 128, wrap) once;
  train   one model per k through `xdlm.train.loop.train`, identical except `kernel.k` (and
          `kernel.use_mask=false` for k = 1);
  eval    validation NELBO, zero-shot NELBO per corpus, few-step samples (gen-PPL + entropy);
  report  raw JSON, the Pareto plot and the `## Text: the k trade-off` table in docs/results.md.

Every setting lives in `tradeoff.yaml` (fixed before results were seen); see README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from report import markdown_section, plot_pareto, summary_rows, write_section

from xdlm.builders import build_sampler
from xdlm.config import SampleConfig, XDLMConfig, merge
from xdlm.data.documents import read_documents
from xdlm.data.loader import TokenShards
from xdlm.data.prepare import prepare
from xdlm.data.tokenizers import load_tokenizer_dir
from xdlm.eval.genquality import load_scorer, sample_quality
from xdlm.eval.likelihood import evaluate_split
from xdlm.eval.sweep import SamplingSetting, sweep
from xdlm.eval.zeroshot import zero_shot
from xdlm.precision import cpu_description
from xdlm.runs import find_checkpoint, load_run, read_meta
from xdlm.train.loop import train

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TEXT = REPO.parent / "shared" / "data" / "text"
STAGES = ("data", "train", "eval", "report")


def load_settings(path: Path = HERE / "tradeoff.yaml") -> dict:
    """The experiment's YAML (ks, data, base config, budgets)."""
    return yaml.safe_load(path.read_text())


def model_config(settings: dict, budget: str, k: float, data_dir: Path) -> XDLMConfig:
    """The XDLMConfig of model k: base, then the budget's overrides, then k (the only change)."""
    if budget not in settings["budgets"]:
        raise ValueError(f"unknown budget {budget!r}; choose one of {sorted(settings['budgets'])}")
    cfg = merge(XDLMConfig(), settings["base"])
    cfg = merge(cfg, settings["budgets"][budget]["config"])
    kernel = {"k": float(k), "use_mask": k != 1.0}
    return merge(cfg, {"kernel": kernel, "data": {"path": str(data_dir), "sources": []}})


def run_name(k: float) -> str:
    """Directory name of model k: k0, k0.01, ..., k1-nomask."""
    return f"k{k:g}" + ("-nomask" if k == 1.0 else "")


def _brown_documents(path: Path, lines_per_doc: int, out: Path) -> Path:
    """Brown has one sentence a line and no blank line (one 6 MB document): write it as
    documents of `lines_per_doc` consecutive sentences so that the document split applies."""
    lines = read_documents(path)[0].split("\n")
    chunks = ["\n".join(lines[i : i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8") as fh:
        fh.write("\n\n".join(chunks) + "\n")
    return out


def corpus_prefix(path: Path, max_tokens: int, out: Path, chars_per_token: int = 16) -> Path:
    """The first documents of `path` holding >= chars_per_token·max_tokens characters, as a
    .txt.gz in `out`: zero-shot on it evaluates exactly the same first rows as on the whole
    corpus (wrap keeps document order) without tokenizing megabytes per model. The result's
    `tokens_available` is checked to exceed `max_tokens` in `evaluate_model`."""
    target = out / path.name
    if not target.is_file():
        docs, size = [], 0
        for doc in read_documents(path):
            docs.append(doc)
            size += len(doc)
            if size >= chars_per_token * max_tokens:
                break
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(target, "wt", encoding="utf-8") as fh:
            fh.write("\n\n".join(docs) + "\n")
    return target


def prepare_data(settings: dict, budget: str, out: Path) -> Path:
    """Prepare the training set once per `out` (BPE trained on its training split only)."""
    data_dir = out / "data"
    if (data_dir / "manifest.json").is_file():
        return data_dir
    spec, cfg = settings["data"], model_config(settings, budget, 0.0, data_dir)
    sources = []
    for name in spec["train_sources"]:
        src = TEXT / name
        if not src.is_file():
            raise FileNotFoundError(f"{src} is missing; the experiment needs ../shared/data/text")
        if name.startswith("brown"):
            src = _brown_documents(src, spec["brown_lines_per_doc"], out / "sources" / name)
        sources.append(src)
    prepare(
        sources, data_dir, tokenizer=cfg.data.tokenizer,
        tokenizer_vocab_size=cfg.data.tokenizer_vocab_size, seq_len=cfg.data.seq_len,
        mode=cfg.data.mode, valid_fraction=spec["valid_fraction"], seed=0,
    )  # fmt: skip
    return data_dir


def train_all(
    settings: dict, budget: str, out: Path, data_dir: Path, train_missing: bool = True
) -> dict[str, dict]:
    """Train (or find already trained) every k; {run name: {"run_dir", "wall_s", "step", ...}}.
    With `train_missing=False` only the finished runs are returned (evaluation while training)."""
    runs = {}
    for k in settings["ks"]:
        cfg, run_dir = model_config(settings, budget, k, data_dir), out / "runs" / run_name(k)
        info_path = run_dir / "train_info.json"
        if not info_path.is_file() and not train_missing:
            continue
        if not info_path.is_file():
            start = time.perf_counter()
            result = train(cfg, run_dir, resume=(run_dir / "checkpoints" / "latest").is_file())
            if result.interrupted or result.step < cfg.train.steps:
                raise RuntimeError(f"training of {run_dir} stopped at step {result.step}")
            info = {"k": k, "wall_s": time.perf_counter() - start, "step": result.step,
                    "tokens_per_s": result.tokens_per_s, "final_valid": result.valid}  # fmt: skip
            info_path.write_text(json.dumps(info, indent=1))
        info = json.loads(info_path.read_text())
        meta = read_meta(find_checkpoint(run_dir))
        runs[run_name(k)] = {**info, "run_dir": str(run_dir), "kernel": meta["kernel"]}
    return runs


# Sampler fixed before any result (README): ancestral posterior steps, t grid, temperature 1,
# no top-k/top-p, ancestral noise-removal final step.
PLAN = build_sampler(SampleConfig(sampler="ancestral", final="ancestral", grid="t", t_end=1e-5))
SAMPLER = {"sampler": PLAN.sampler, "final": PLAN.final, "grid": PLAN.grid}


def evaluate_model(run_dir: Path, data_dir: Path, spec: dict, scorer, device: str) -> dict:
    """Validation NELBO, zero-shot NELBO per corpus and the few-step sample sweep of one model."""
    loaded = load_run(run_dir, device=device)
    model, kernel, schedule, tok = loaded.model, loaded.kernel, loaded.schedule, loaded.tokenizer
    seq_len, bound = (
        loaded.config.data.seq_len,
        {"seed": spec["seed"], "t_samples": spec["t_samples"]},
    )
    batch = spec["sample_batch"]
    start = time.perf_counter()
    valid = evaluate_split(model, kernel, schedule, data_dir, "valid", batch_size=batch,
                           max_batches=-(-spec["valid_rows"] // batch), **bound)  # fmt: skip
    cap, prefixes = spec["zero_shot_tokens"], data_dir.parent / "zero_shot_prefixes"
    corpora = [str(corpus_prefix(TEXT / n, cap, prefixes)) for n in spec["zero_shot_sources"]]
    zs = zero_shot(model, kernel, schedule, tok, corpora, seq_len=seq_len, mode="wrap",
                   max_tokens=cap, batch_size=batch, **bound)  # fmt: skip
    if short := [c for c, v in zs.items() if v["tokens_available"] < cap]:
        raise RuntimeError(f"corpus prefixes {short} hold fewer than {cap} tokens; raise chars")
    t_likelihood = time.perf_counter() - start
    rows = sweep(model, kernel, schedule, tok, scorer, steps=spec["steps"],
                 settings=(SamplingSetting(1.0, None),), num_samples=spec["num_samples"],
                 seq_len=seq_len, batch_size=batch, seed=spec["seed"], device=device,
                 **SAMPLER)  # fmt: skip
    return {
        "step": loaded.step,
        "valid": valid.to_dict(),
        "zero_shot": {Path(c).name.split(".")[0]: v for c, v in zs.items()},
        "samples": rows,
        "eval_wall_s": {"likelihood": t_likelihood, "total": time.perf_counter() - start},
    }


def reference_quality(data_dir: Path, spec: dict, scorer) -> dict:
    """The sample metrics of `num_samples` real validation rows (the entropy to match)."""
    shards = TokenShards(data_dir, "valid")
    rows = shards.rows(torch.arange(spec["num_samples"])).tokens
    return sample_quality(rows, load_tokenizer_dir(data_dir / "tokenizer"), scorer)


def evaluate_all(
    settings: dict, budget: str, out: Path, data_dir: Path, device: str, runs: dict
) -> dict:
    """Evaluate the trained `runs` (cached per model in its run dir) and the real-text reference."""
    spec = {**settings["budgets"][budget]["eval"], **settings["data"]}
    scorer = load_scorer("smollm2", device=device)
    ref_path = out / "reference_quality.json"
    if not ref_path.is_file():
        ref_path.write_text(json.dumps(reference_quality(data_dir, spec, scorer), indent=1))
    results = {"reference": json.loads(ref_path.read_text()), "models": {}}
    for name, run in runs.items():
        run_dir = Path(run["run_dir"])
        path = run_dir / "eval.json"
        if not path.is_file():
            path.write_text(
                json.dumps(evaluate_model(run_dir, data_dir, spec, scorer, device), indent=1)
            )
            print(f"evaluated {run_dir.name}", flush=True)
        results["models"][name] = {"k": run["k"], **json.loads(path.read_text())}
    return results


def setup_line(settings: dict, budget: str) -> str:
    """'4 × 256 DiT, 2000 steps × 32 × 128 = 8.2 M tokens per model' for a budget."""
    cfg = model_config(settings, budget, 0.0, Path("."))
    m, d, t = cfg.model, cfg.data, cfg.train
    tokens = t.steps * d.batch_size * d.seq_len
    return (
        f"{m.n_layers} × {m.d_model} DiT, {t.steps} steps × {d.batch_size} × {d.seq_len} = "
        f"{tokens / 1e6:.1f} M tokens per model"
    )


def report(results: dict, settings: dict, budget: str, command: str, root: Path = REPO) -> None:
    """Raw JSON, the plot and the budget's subsection of docs/results.md (with the analysis in
    results/<budget>.notes.md), written under the repository `root` (a temporary dir in tests)."""
    rows = summary_rows(results)
    results["summary"] = rows
    raw = root / "experiments" / "tradeoff" / "results" / f"{budget}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    plot = root / "docs" / "img" / f"tradeoff_{budget}.png"
    plot_pareto(rows, results["reference"], plot, f"k trade-off, budget {budget}")
    notes = HERE / "results" / f"{budget}.notes.md"
    note = notes.read_text() if notes.is_file() else "(no analysis written yet)"
    setup = setup_line(settings, budget)
    section = markdown_section(results, rows, command, setup, f"img/{plot.name}", note)
    write_section(root / "docs" / "results.md", budget, section)
    print(f"wrote {raw}, {plot} and docs/results.md", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="cpu-short")
    parser.add_argument("--out", default=None, help="work dir (default runs/tradeoff/<budget>)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", default=None, help="comma-separated subset of k (default: all)")
    parser.add_argument("--machine", default="2 shared CPU cores (nice -n 10)", help="load")
    parser.add_argument("--publish", default=str(REPO), help="root for results/, docs/ output")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    if bad := sorted(set(stages) - set(STAGES)):
        raise ValueError(f"unknown stage(s) {bad}; choose from {STAGES}")
    settings = load_settings()
    if args.ks is not None:
        settings["ks"] = [k for k in settings["ks"] if f"{k:g}" in args.ks.split(",")]
    out = Path(args.out or REPO / "runs" / "tradeoff" / args.budget)
    t0 = time.perf_counter()
    data_dir = prepare_data(settings, args.budget, out)
    print(f"data ready in {data_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "train" in stages or "eval" in stages:
        runs = train_all(settings, args.budget, out, data_dir, "train" in stages)
    if "eval" in stages:
        results = evaluate_all(settings, args.budget, out, data_dir, args.device, runs)
        for name, run in runs.items():
            results["models"][name]["train"] = run
        wall = sum(r["wall_s"] for r in runs.values())
        wall += sum(m["eval_wall_s"]["total"] for m in results["models"].values())
        cpu = cpu_description()
        machine = f"{args.machine}; {cpu['cpu']} ({cpu['capability']}, {cpu['threads']} threads)"
        results.update(budget=args.budget, machine=machine, wall_s=wall)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    if "report" in stages:
        results = json.loads((out / "results.json").read_text())
        command = f"python experiments/tradeoff/run.py --budget {args.budget}"
        command += f" --ks {args.ks}" if args.ks is not None else ""
        report(results, settings, args.budget, command, Path(args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
