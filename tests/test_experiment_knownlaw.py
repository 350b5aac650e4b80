"""experiments/knownlaw: models differ only in k and the seed; the seed statistics pair by seed;
the smoke budget runs end to end and its checkpoints score exactly under the law (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from experiment_modules import experiment_modules, grid_configs

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments" / "knownlaw"


@pytest.fixture(scope="module")
def knownlaw():
    """The experiment's run.py and report.py as modules."""
    yield from experiment_modules("knownlaw")


@pytest.mark.parametrize("budget", ["smoke", "cpu"])
def test_models_differ_only_in_k_and_seed(knownlaw, budget):
    run = knownlaw["run"]
    settings = run.load_settings()
    pairs = run.models(settings)
    assert (
        len(pairs) == len(settings["ks"]) * len(settings["seeds"]) and len(settings["seeds"]) >= 3
    )
    grid_configs(run, settings, budget)


def _model(k: float, seed: int, nelbo: float, nll4: float) -> dict:
    sample = {"steps": 4, "invalid": 0, "law_nll": {"mean": nll4}, "unigram_entropy": 2.0}
    like = {"nelbo": {"nats_per_token": nelbo}, "gap": {"mean": nelbo - 2.0}}
    return {"k": k, "seed": seed, "likelihood": like, "samples": [sample]}


def test_summary_pairs_by_seed(knownlaw):
    report = knownlaw["report"]
    models = [_model(0.0, s, 2.0 + 0.1 * s, 3.0) for s in range(3)]
    models += [_model(0.1, s, 2.0 + 0.1 * s + 0.019 + 0.001 * s, 2.9) for s in range(3)]
    results = {"reference": {"entropy": {"mean": 2.0}}, "models": dict(enumerate(models))}
    summary = report.summarize(results)
    d = summary["0.1"]["paired_vs_k0"]["nelbo"]
    assert math.isclose(d["mean"], 0.02) and d["lo"] > 0  # the seed offsets cancel in pairs
    assert summary["0.1"]["ci"]["nelbo"]["lo"] < summary["0"]["ci"]["nelbo"]["hi"]
    assert math.isclose(summary["0.1"]["paired_vs_k0"]["nll@4"]["mean"], -0.1)
    assert math.isclose(summary["0"]["values"]["rel_gap"][2], 0.1)


@pytest.mark.slow
def test_smoke_budget_end_to_end(tmp_path, knownlaw):
    cmd = [sys.executable, str(EXP / "run.py"), "--budget", "smoke", "--out", str(tmp_path),
           "--publish", str(tmp_path / "pub"), "--jobs", "2"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    raw = json.loads((tmp_path / "pub" / "experiments/knownlaw/results/smoke.json").read_text())
    assert len(raw["models"]) == 9 and set(raw["summary"]) == {"0", "0.1", "1"}
    text = (tmp_path / "pub" / "docs" / "results.md").read_text()
    assert knownlaw["report"].SECTION in text and "(a) k = 0.1 vs k = 0" in text
    assert (tmp_path / "pub" / "docs" / "img" / "knownlaw_smoke.png").stat().st_size > 0
    assert (tmp_path / "runs" / "k0.1-s2" / "checkpoints" / "latest").is_file()


def test_a_budget_may_widen_the_grid_without_touching_the_others(knownlaw):
    run = knownlaw["run"]
    settings = run.load_settings()
    wide = run.budget_grid(settings, "cpu-1500")
    assert [k for k, s in run.models(wide) if s == 0] == [0.0, 0.01, 0.1, 0.5, 1.0]
    assert run.models(run.budget_grid(settings, "cpu-3000")) == run.models(settings)
    # cpu-3000-wide is cpu-3000 with the two extra k, so cpu-3000's models are among its own
    same = {key: v for key, v in settings["budgets"]["cpu-3000-wide"].items() if key != "ks"}
    assert same == settings["budgets"]["cpu-3000"]
    assert set(run.models(settings)) < set(run.models(run.budget_grid(settings, "cpu-3000-wide")))
    assert settings["ks"] == [0.0, 0.1, 1.0]  # the loaded settings are not modified
