"""MNIST class-conditional experiment: k = 0 (MDLM), 0.1 (XDLM), 1 (UDLM) at identical budgets.

    nice python experiments/mnist/run.py                 # prepare, train the three, evaluate
    nice python experiments/mnist/run.py --only-k 0.1    # one model (skips finished training)
    python experiments/mnist/run.py --table              # markdown table of the results
    ... --set train.steps=600 --tag -600                 # another budget, beside the first
    for k in 0 0.1 1; do nice python experiments/mnist/run.py --only-k $k --threads 1 & done

Data: ../shared/data/images/mnist10k.npz -> 14x14, 4 grey levels (configs/mnist.yaml); the
held-out "valid" split (1,000 images) is the real set of the metric. Each model is trained with
`xdlm.train.loop.train` and evaluated at T = 4, 8, 16, 32 steps, guidance w = 0 and w = GUIDANCE,
PER_CLASS samples a class, ancestral sampler, seed 0 (all fixed before looking at results).
Writes experiments/mnist/results/k{k}.json and docs/img/mnist-k{k}.png.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from xdlm.commands.images import reference_classifier, save_grid
from xdlm.config import load_config
from xdlm.data.images import image_info, prepare_images
from xdlm.eval.images import classifier_accuracy, image_metrics, sample_classes
from xdlm.runs import load_run
from xdlm.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
NPZ = ROOT.parent / "shared" / "data" / "images" / "mnist10k.npz"
KS = (0.0, 0.1, 1.0)
STEPS = (4, 8, 16, 32)
GUIDANCE = 1.0
PER_CLASS = 5
SEED = 0


def _train(k: float, run_dir: Path, overrides: list[str]) -> float | None:
    """Train unless the run already finished; returns the training wall time (None if reused)."""
    cfg = load_config(ROOT / "configs" / "mnist.yaml", [f"kernel.k={k}", *overrides])
    if (run_dir / "checkpoints" / "latest").is_file():
        return None
    start = time.perf_counter()
    train(cfg, run_dir)
    return time.perf_counter() - start


def evaluate(k: float, run_dir: Path, data_dir: str, tag: str = "") -> dict:
    """Metrics at every (steps, guidance) of the grid for one trained model."""
    loaded = load_run(run_dir)
    info = image_info(data_dir)
    clf, real = reference_classifier(data_dir, SEED)
    rows = []
    for steps in STEPS:
        for w in (0.0, GUIDANCE):
            s = sample_classes(
                loaded, info, steps=steps, per_class=PER_CLASS, guidance=w, seed=SEED
            )
            m = image_metrics(clf, real.images, real.labels, s.images, s.labels.numpy())
            rows.append({"steps": steps, "guidance": w, "nfe": s.nfe, **asdict(m)})
            print(f"k={k} T={steps} w={w}: fid={m.fid:.2f} acc={m.accuracy:.3f}", flush=True)
            if steps == max(STEPS) and w == GUIDANCE:
                save_grid(s.images, PER_CLASS, ROOT / "docs" / "img" / f"mnist-k{k:g}{tag}.png",
                          f"k={k}, T={steps}, w={w}")  # fmt: skip
    return {"k": k, "run_dir": str(run_dir), "train_step": loaded.step,
            "classifier_valid_accuracy": classifier_accuracy(clf, real.images, real.labels),
            "per_class": PER_CLASS, "seed": SEED, "results": rows}  # fmt: skip


def table(out: Path, tag: str = "") -> str:
    """Markdown table of results/k{k}{tag}.json: FID / accuracy per (steps, guidance) and k."""
    files = [out / f"k{k:g}{tag}.json" for k in KS]
    runs = [json.loads(f.read_text()) for f in files if f.is_file()]
    head = "| T | w | " + " | ".join(f"k={r['k']:g} FID / acc" for r in runs) + " |"
    lines = [head, "|---|---|" + "---|" * len(runs)]
    for i, row in enumerate(runs[0]["results"]):
        cells = [f"{r['results'][i]['fid']:.2f} / {r['results'][i]['accuracy']:.2f}" for r in runs]
        lines.append(f"| {row['steps']} | {row['guidance']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only-k", type=float, default=None)
    parser.add_argument("--runs", default="runs/mnist")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--table", action="store_true", help="print the results table only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--tag", default="", help="suffix of run dirs, results and images")
    args = parser.parse_args()
    out = ROOT / "experiments" / "mnist" / "results"
    if args.table:
        print(table(out, args.tag))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = load_config(ROOT / "configs" / "mnist.yaml").data.path
    if not (Path(data_dir) / "manifest.json").is_file():
        prepare_images(NPZ, data_dir, size=14, levels=4, valid_fraction=0.1, seed=SEED)
    out.mkdir(parents=True, exist_ok=True)
    (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
    for k in KS if args.only_k is None else (args.only_k,):
        run_dir = Path(args.runs) / f"k{k:g}{args.tag}"
        wall = _train(k, run_dir, args.overrides)
        start = time.perf_counter()
        result = evaluate(k, run_dir, data_dir, args.tag)
        result.update(train_wall_s=wall, eval_wall_s=time.perf_counter() - start)
        result["overrides"] = args.overrides
        (out / f"k{k:g}{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
