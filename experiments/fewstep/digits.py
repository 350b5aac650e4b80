"""Few-step frontier on digits: conditional accuracy, FID and diversity (the digits experiment's
reference classifier) vs NFE for MDLM (k = 0) and XDLM (k = 0.1) × {ancestral,
predictor-corrector, threshold decoding, distilled students} at T ∈ {1, ..., 32}, three seeds
(issue 31; the known-law half is run.py).

    python experiments/fewstep/digits.py --budget digits-cpu-1000 --jobs 2
    python experiments/fewstep/digits.py --budget digits-smoke --out /tmp/fd --publish /tmp/fd

Stages (each skips work already done in `--out`, so a stopped run resumes where it was):
  data     the digits experiment's images and reference classifier
           (`experiments/digits/run.py`'s `prepare_data`, with its accuracy check);
  train    one teacher per (k, seed): the digits model of `digits_budget` with `teacher`'s
           training overrides;
  distill  one student per teacher by progressive few-step distillation (`xdlm.distill`);
  eval     per model and method, `per_class` samples of every class at every T of the budget
           with guidance w, scored by the classifier (`<run>/fewstep_eval.json`);
  report   one row per (method, k, T, seed) in results/<budget>.json, 95 % t-intervals over
           seeds, paired differences to ancestral, the goal, the plot and the
           `## Few-step frontier on digits` section of docs/results.md (digits_report.py).

The stages, the phases of the workers and the sampler plans are run.py's (`work` with this
file's scorer); every setting lives in digits.yaml (fixed before any result).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # digits_report.py
sys.path.insert(0, str(HERE.parent))  # experiments/seedgrid.py
from seedgrid import load_module, models, parse_args, run_name, run_stages  # noqa: E402

from xdlm.commands.images import reference_classifier  # noqa: E402
from xdlm.data.images import image_info  # noqa: E402
from xdlm.eval.images import sample_classes  # noqa: E402
from xdlm.runs import load_run  # noqa: E402

frontier = load_module("fewstep_run", HERE / "run.py")  # the known-law frontier's stages
digits = load_module("digits_run", HERE.parent / "digits" / "run.py")  # the digits experiment's


def load_settings(budget: str, path: Path = HERE / "digits.yaml") -> dict:
    """The digits settings with this experiment's grid and budget (`run.teacher_settings`)."""
    own = yaml.safe_load(path.read_text())
    return frontier.teacher_settings(own, budget, digits.load_settings(), "digits_budget")


def digits_scorer(settings: dict, out: Path, spec: dict):
    """score(model dir, T, sampler keywords) -> a row's measurements: `per_class` samples of
    every class at guidance w, scored by the reference classifier (`digits.score_samples`:
    accuracy, fid, diversity, real_diversity, NFE, invalid)."""
    data_dir, ev = out / "data", spec["eval"]
    info = image_info(data_dir)
    clf, real = reference_classifier(str(data_dir), digits.classifier_seed(settings, out))

    def score(src: Path, steps: int, kwargs: dict) -> dict:
        start = time.perf_counter()
        s = sample_classes(load_run(src), info, steps=steps, per_class=ev["per_class"],
                           guidance=ev["guidance"], seed=ev["seed"], **kwargs)  # fmt: skip
        scores = digits.score_samples(s, info, clf, real)
        return {"steps": steps, "guidance": ev["guidance"], **scores,
                "wall_s": time.perf_counter() - start}  # fmt: skip

    return score


def collect(settings: dict, out: Path) -> dict:
    """Every evaluated row with the classifier's record and the teachers' training info."""
    rows, teachers = [], {}
    for k, seed in models(settings):
        run_dir = out / "runs" / run_name(k, seed)
        if (run_dir / "fewstep_eval.json").is_file():
            rows += json.loads((run_dir / "fewstep_eval.json").read_text())
            teachers[run_dir.name] = json.loads((run_dir / "train_info.json").read_text())
    classifier = json.loads((out / "classifier.json").read_text())
    return {"classifier": classifier, "teachers": teachers, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__, "fewstep-digits", "digits-cpu-1000", frontier.STAGES)
    settings = load_settings(args.budget)
    return run_stages(
        __file__, args, settings, lambda: digits.prepare_data(settings, args.out),
        functools.partial(frontier.work, scorer=digits_scorer),
        lambda: collect(settings, args.out), report_module="digits_report",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
