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

import yaml

from xdlm.config import XDLMConfig, merge
from xdlm.data.documents import read_documents
from xdlm.data.prepare import prepare
from xdlm.train.checkpoint import find_checkpoint, read_meta
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


def train_all(settings: dict, budget: str, out: Path, data_dir: Path) -> dict[str, dict]:
    """Train (or find already trained) every k; {run name: {"run_dir", "wall_s", "step"}}."""
    runs = {}
    for k in settings["ks"]:
        cfg, run_dir = model_config(settings, budget, k, data_dir), out / "runs" / run_name(k)
        info_path = run_dir / "train_info.json"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="cpu-short")
    parser.add_argument("--out", default=None, help="work dir (default runs/tradeoff/<budget>)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    if bad := sorted(set(stages) - set(STAGES)):
        raise ValueError(f"unknown stage(s) {bad}; choose from {STAGES}")
    settings = load_settings()
    out = Path(args.out or REPO / "runs" / "tradeoff" / args.budget)
    t0 = time.perf_counter()
    data_dir = prepare_data(settings, args.budget, out)
    print(f"data ready in {out / 'data'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "train" in stages:
        runs = train_all(settings, args.budget, out, data_dir)
        print(json.dumps({n: r["wall_s"] for n, r in runs.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
