"""Few-step frontier on the known law: quality (exact −log p under the law) vs NFE for MDLM
(k = 0) and XDLM (k = 0.1) × {ancestral, predictor-corrector, threshold decoding, dilated
(planned) reveals, distilled students} at T ∈ {1, ..., 32}, three seeds (issue 31).

    python experiments/fewstep/run.py --budget cpu-800 --jobs 2     # data, teachers, students,
                                                                    # eval, report
    python experiments/fewstep/run.py --budget smoke --out /tmp/fs --publish /tmp/fs  # seconds

Stages (each skips work already done in `--out`, so a stopped run resumes where it was):
  data     the known law's data and reference (`experiments/knownlaw/run.py`'s `prepare_data`);
  train    one teacher per (k, seed): the known-law model of `knownlaw_budget` with `teacher`'s
           training overrides (`xdlm.train.loop.train`, resumable);
  distill  one student per teacher by progressive few-step distillation (`xdlm.distill`:
           rounds T -> T/2, each round's student teaching the next), resumable;
  eval     per model and method, samples at every T of the budget, scored with the exact
           −log p(x)/L beside their unigram entropy (`<run>/fewstep_eval.json`);
  report   one row per (method, k, T, seed) in results/<budget>.json, 95 % t-intervals over
           seeds, the plot and the `## Few-step frontier` section of docs/results.md.

Every setting lives in `fewstep.yaml` (fixed before any result was seen).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import yaml

from xdlm.builders import build_sampler
from xdlm.config import SampleConfig
from xdlm.data.synthetic import load_law
from xdlm.eval.genquality import unigram_entropy
from xdlm.eval.sweep import SamplingSetting, generate_many
from xdlm.runs import load_run
from xdlm.train.distill import distill

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/seedgrid.py
from seedgrid import (  # noqa: E402
    budget_spec,
    model_config,
    models,
    parse_args,
    run_name,
    run_stages,
    train_model,
)

_SPEC = importlib.util.spec_from_file_location("knownlaw_run", HERE.parent / "knownlaw" / "run.py")
knownlaw = importlib.util.module_from_spec(_SPEC)  # the known-law experiment's stages
_SPEC.loader.exec_module(knownlaw)
STAGES = ("data", "train", "distill", "eval", "report")


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else copy.deepcopy(value)  # fmt: skip
    return out


def load_settings(budget: str, path: Path = HERE / "fewstep.yaml") -> dict:
    """The known-law settings with this experiment's grid and budget (`teacher_settings`)."""
    own = yaml.safe_load(path.read_text())
    return teacher_settings(own, budget, knownlaw.load_settings(), "knownlaw_budget")


def teacher_settings(own: dict, budget: str, parent: dict, parent_key: str) -> dict:
    """The parent experiment's settings with this experiment's grid (ks, and the seeds of the
    budget if it lists them, else of the file) and, as the
    budget's block, the parent budget named by `parent_key` (the budget's, else the file's) with
    the `teacher` overrides merged into its config, its eval updated by the budget's, plus the
    budget's distill / methods / samplers sections."""
    spec = budget_spec(own, budget)
    base = budget_spec(parent, spec.get(parent_key, own[parent_key]))
    merged = {**_deep_merge(base, {"config": spec.get("teacher", {})}),
              **{key: spec[key] for key in ("distill", "eval", "samplers", "methods")}}  # fmt: skip
    merged["eval"] = {**base["eval"], **spec["eval"]}
    seeds = spec.get("seeds", own["seeds"])  # a budget may list its own seeds
    return {**parent, "ks": own["ks"], "seeds": seeds, "budgets": {budget: merged}}


def law_scorer(settings: dict, out: Path, spec: dict):
    """score(model dir, T, sampler keywords) -> a row's measurements: `sample_row` under the
    known law of `out`."""
    law = load_law(out / "data")
    return lambda src, steps, kwargs: sample_row(load_run(src), law, spec["eval"], steps, kwargs)


def work(
    settings: dict, budget: str, out: Path, stages: list[str], share: tuple[int, int],
    scorer=law_scorer,
):  # fmt: skip
    """Worker `share` = (i, n) over its models, in phases so that every seed of a phase is done
    before the next starts: teachers; their samplers; students; the students' samples. Samples
    are measured by `scorer(settings, out, spec)` (the known law's here; digits.py's)."""
    spec, data_dir = budget_spec(settings, budget), out / "data"
    grid = [(k, s, out / "runs" / run_name(k, s)) for k, s in models(settings)]
    mine = grid[share[0] :: share[1]]
    if "train" in stages:
        for k, seed, run_dir in mine:
            train_model(model_config(settings, budget, k, seed, data_dir), run_dir)
            print(f"trained {run_dir.name}", flush=True)
    else:  # the later stages may run beside a training job: only on finished teachers
        mine = [m for m in mine if (m[2] / "train_info.json").is_file()]
    score = scorer(settings, out, spec) if "eval" in stages else None
    if score is not None:
        for _, _, run_dir in mine:
            evaluate(run_dir, run_dir, spec, tuple(spec["methods"]), score)
    d = spec["distill"]
    if "distill" in stages:
        for _, _, run_dir in mine:
            distill(run_dir, student_dir(run_dir), d["rounds"], d["steps_per_round"], d["set"],
                    resume=True)  # fmt: skip
            print(f"distilled {run_dir.name}", flush=True)
    if score is not None:
        for _, _, run_dir in mine:
            if (student_dir(run_dir) / f"T{d['rounds'][-1]}").is_dir():
                evaluate(run_dir, student_dir(run_dir), spec, ("distilled",), score)


def student_dir(run_dir: Path) -> Path:
    """<out>/students/<run name>: the rounds' run dirs T<T> of one teacher."""
    return run_dir.parent.parent / "students" / run_dir.name


# method -> (sample.sampler, other SampleConfig settings); every other method is its sampler
VARIANTS = {
    "distilled": ("ancestral", {}),
    "threshold-remask": ("threshold", {}),
    "dilated": ("dilated", {"grid": "doubling"}),
    "dilated-uniform": ("dilated", {"grid": "doubling", "dilated_uniform_reveal": True}),
    "dilated-t": ("dilated", {}),
    "dilated-final": ("dilated", {"grid": "doubling", "t_end": 0.25}),
}


def plan(method: str, spec: dict):
    """The sampler keywords of `generate` for a method (`VARIANTS`: ancestral for the distilled
    students; `threshold` without and `threshold-remask` with re-masking; `dilated` on the
    doubling grid, its ablations with the uniform route kept or on the uniform-t grid;
    `dilated-final` on the doubling grid stopped at t = 0.25, α ≈ 3/4, so that the final step
    reveals the last quarter and, for k > 0, revises visible tokens)."""
    s = spec["samplers"]
    name, extra = VARIANTS.get(method, (method, {}))
    remask = s["threshold_remask"] if method == "threshold-remask" else 0.0
    cfg = SampleConfig(sampler=name, final="ancestral",
                       pc_eta=s["pc_eta"], threshold=s["threshold"],
                       threshold_revise=s["threshold_revise"], threshold_remask=remask,
                       **{"grid": "t", "t_end": 1e-5, **extra})  # fmt: skip
    kw = build_sampler(cfg).generate_kwargs()
    kw.pop("filter")  # temperature 1, no top-k / top-p (generate_many's default setting)
    return kw


def method_steps(spec: dict, method: str) -> list[int]:
    return spec["distill"]["rounds"] if method == "distilled" else spec["methods"][method]


def evaluate(run_dir: Path, model_dir: Path, spec: dict, methods, score) -> None:
    """Rows (method, T) of one teacher: `score(model dir, T, sampler keywords)`, appended to
    <run_dir>/fewstep_eval.json as they are done (a stopped evaluation resumes)."""
    path = run_dir / "fewstep_eval.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["method"], r["steps"]) for r in rows}
    info = json.loads((run_dir / "train_info.json").read_text())
    for method in methods:
        for steps in method_steps(spec, method):
            if (method, steps) in done:
                continue
            src = model_dir / f"T{steps}" if method == "distilled" else model_dir
            row = score(src, steps, plan(method, spec))
            rows.append({"method": method, "k": info["k"], "seed": info["seed"], **row})
            path.write_text(json.dumps(rows, indent=1))
        print(f"evaluated {run_dir.name} {method}", flush=True)


def sample_row(loaded, law, ev: dict, steps: int, kwargs: dict) -> dict:
    """T steps, `num_samples` sequences: NFE per batch, −log p(x)/L (mean, SE), entropy."""
    seq_len, n = loaded.config.data.seq_len, ev["num_samples"]
    tokens, nfe, wall = generate_many(
        loaded.model, loaded.kernel, loaded.schedule, num_samples=n, seq_len=seq_len,
        steps=steps, setting=SamplingSetting(), batch_size=ev["sample_batch"], seed=ev["seed"],
        **kwargs,
    )  # fmt: skip
    nll = knownlaw.per_token(-law.log_prob(tokens), seq_len)
    batches = -(-n // ev["sample_batch"])
    return {"steps": steps, "nfe": nfe / batches, "nll_per_token": nll["mean"],
            "nll_se": nll["se"], "unigram_entropy": unigram_entropy(tokens.tolist()),
            "wall_s": wall}  # fmt: skip


def collect(settings: dict, out: Path) -> dict:
    """Every evaluated row with the law's reference."""
    reference = json.loads((out / "law_reference.json").read_text())
    rows = []
    for k, seed in models(settings):
        path = out / "runs" / run_name(k, seed) / "fewstep_eval.json"
        rows += json.loads(path.read_text()) if path.is_file() else []
    return {"reference": reference, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__, "fewstep", "cpu-800", STAGES)
    settings = load_settings(args.budget)
    return run_stages(
        __file__, args, settings,
        lambda: knownlaw.prepare_data(settings, args.budget, args.out), work,
        lambda: collect(settings, args.out),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
