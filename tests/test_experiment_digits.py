"""experiments/digits: models differ only in k and the seed; the conditional NELBO uses each
digit's own class; the report's statistics pair by seed and state the criteria from the numbers;
the smoke budget runs end to end on the shared MNIST digits (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from experiment_modules import experiment_modules, grid_configs

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments" / "digits"
NPZ = ROOT.parent / "shared" / "data" / "images" / "mnist10k.npz"


@pytest.fixture(scope="module")
def digits():
    """The experiment's run.py and report.py as modules."""
    yield from experiment_modules("digits")


@pytest.mark.parametrize("budget", ["smoke", "cpu", "cpu-1500", "cpu-2500", "cpu-2500-s5"])
def test_models_differ_only_in_k_and_seed(digits, budget):
    run = digits["run"]
    settings = run.budget_grid(run.load_settings(), budget)
    pairs = run.models(settings)
    assert {k for k, _ in pairs} >= {0.0, 0.1, 1.0} and len(settings["seeds"]) >= 3
    cfgs = grid_configs(run, settings, budget)
    assert cfgs[0].model.num_classes == 10 and cfgs[0].train.cond_drop > 0


def test_cpu_2500_s5_is_cpu_2500_with_two_more_seeds(digits):
    """Run in cpu-2500's work dir, it reuses those 9 models: only valid if their config and
    evaluation are the same."""
    run = digits["run"]
    settings = run.load_settings()
    same = {key: v for key, v in settings["budgets"]["cpu-2500-s5"].items() if key != "seeds"}
    assert same == settings["budgets"]["cpu-2500"]
    five = run.models(run.budget_grid(settings, "cpu-2500-s5"))
    assert set(run.models(settings)) < set(five) and {s for _, s in five} == {0, 1, 2, 3, 4}
    assert settings["seeds"] == [0, 1, 2]  # the loaded settings are not modified


def _model(k: float, seed: int, nelbo: float, acc32: float) -> dict:
    rows = [{"steps": t, "guidance": 1.0, "accuracy": a, "fid": 10.0 - a, "diversity": 9.0,
             "real_diversity": 9.5} for t, a in ((4, acc32 - 0.2), (32, acc32))]  # fmt: skip
    return {"k": k, "seed": seed, "nelbo": {"nats_per_token": nelbo}, "samples": rows,
            "train": {"wall_s": 60.0}, "eval_wall_s": 6.0}  # fmt: skip


def test_summary_pairs_by_seed_and_answers_state_the_criteria(digits):
    report, run = digits["report"], digits["run"]
    models = [_model(0.0, s, 0.5 + 0.1 * s, 0.85 + 0.01 * s) for s in range(3)]
    models += [_model(0.1, s, 0.5 + 0.1 * s + 0.01, 0.93 + 0.01 * s) for s in range(3)]
    summary = report.summarize({"models": dict(enumerate(models))})
    d = summary["0.1"]["paired_vs_k0"]
    assert math.isclose(d["nelbo"]["mean"], 0.01) and d["nelbo"]["lo"] > 0  # seed offsets cancel
    assert math.isclose(d[report.cell("acc", 32, 1.0)]["mean"], 0.08)
    assert math.isclose(d[report.cell("fid", 4, 1.0)]["mean"], -0.08)
    settings = run.load_settings()
    ev = {"steps": [4, 32], "guidance": [1.0]}
    text = report.answers(summary, ev, {"valid_accuracy": 0.985, "valid_images": 1000}, settings)
    assert "98.5 % on the 1000 held-out digits (needed ≥ 98 %: met)" in text
    assert "at T = 32): met; best k = 0.1 (w = 1): 0.940" in text
    assert "(a) k = 0.1 vs k = 0: ΔNELBO = 0.0100" in text and "(worse)" in text
    low = report.answers(summary, ev, {"valid_accuracy": 0.9, "valid_images": 1000}, settings)
    assert "needed ≥ 98 %: NOT met" in low


@pytest.mark.parametrize("patch", [1, 2])
def test_conditional_nelbo_passes_each_digit_its_class(digits, tmp_path, monkeypatch, patch):
    """The denoiser sees the labels of exactly the rows it scores; a patch token's nats are
    spread over its patch² pixels."""
    import torch

    run = digits["run"]
    seen = []

    class Rows:
        def __init__(self, ids):
            self.tokens = torch.zeros(len(ids), 4, dtype=torch.long)
            self.labels = torch.as_tensor(ids) % 10

    class Shards:
        def __len__(self):
            return 5

        def rows(self, ids):
            return Rows(ids)

    def fake_nelbo(denoiser, kernel, schedule, x0, mask, row_ids, **kw):
        seen.append((row_ids.tolist(), denoiser.keywords["cond"].tolist()))
        from xdlm.eval.likelihood import SequenceNats

        n = len(row_ids)
        return SequenceNats(torch.ones(n, dtype=torch.float64), torch.full((n,), 4))

    monkeypatch.setattr(run, "TokenShards", lambda d, split: Shards())
    monkeypatch.setattr(run, "image_info", lambda d: type("I", (), {"patch": patch}))
    monkeypatch.setattr(run, "sequence_nelbo", fake_nelbo)
    loaded = type("L", (), {"model": lambda *a, **k: None, "kernel": None, "schedule": None})
    out = run.conditional_nelbo(loaded, tmp_path, {"sample_batch": 2, "valid_rows": 5,
                                                   "seed": 0, "t_samples": 1})  # fmt: skip
    assert seen == [([0, 1], [0, 1]), ([2, 3], [2, 3]), ([4], [4])]
    assert math.isclose(out["nats_per_token"], 0.25 / patch**2)  # 1 nat per 4-token row


@pytest.mark.parametrize(
    "accuracies, seed, passes",
    [([0.985], 0, True), ([0.979, 0.98], 1, True), ([0.979, 0.97, 0.975], 2, False)],
)
def test_classifier_below_the_bar_is_retried_and_reported(
    digits, monkeypatch, tmp_path, capsys, accuracies, seed, passes
):
    """Regression (issue 32): seed 0 reached 0.979 < 0.98 on an AMX Xeon and the experiment
    failed. The next seed is tried (at most classifier.retries times), every attempt recorded."""
    run, report = digits["run"], digits["report"]
    real = type("Split", (), {"images": None, "labels": [0] * 1000})()
    monkeypatch.setattr(run, "reference_classifier", lambda data_dir, s: (s, real))
    monkeypatch.setattr(run, "classifier_accuracy", lambda s, images, labels: accuracies[s])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")  # prepared: only the classifier runs
    settings = run.load_settings()
    if not passes:
        with pytest.raises(ValueError, match=r"0\.975 .* below classifier.min_accuracy = 0.98"):
            run.prepare_data(settings, tmp_path)
        return
    assert run.prepare_data(settings, tmp_path) == tmp_path / "data"
    recorded = json.loads((tmp_path / "classifier.json").read_text())
    assert recorded["seed"] == seed == run.classifier_seed(settings, tmp_path)
    assert [a["valid_accuracy"] for a in recorded["attempts"]] == accuracies
    assert f"seed {seed}: held-out accuracy {accuracies[-1]:.4f}" in capsys.readouterr().out
    line = report.answers({}, {"steps": [32], "guidance": [1.0]}, recorded, settings)
    assert f"{100 * accuracies[-1]:.1f} % on the 1000 held-out digits (needed ≥ 98 %: met" in line
    assert ("seed 0 reached only 97.9 %, so seed 1 was trained" in line) == (seed == 1)


@pytest.mark.slow
@pytest.mark.skipif(not NPZ.is_file(), reason="needs ../shared/data/images/mnist10k.npz")
def test_smoke_budget_end_to_end(tmp_path, digits):
    cmd = [sys.executable, str(EXP / "run.py"), "--budget", "smoke", "--out", str(tmp_path),
           "--publish", str(tmp_path / "pub"), "--jobs", "2"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    raw = json.loads((tmp_path / "pub" / "experiments/digits/results/smoke.json").read_text())
    assert len(raw["models"]) == 9 and set(raw["summary"]) == {"0", "0.1", "1"}
    assert raw["classifier"]["valid_accuracy"] >= 0.98  # the reference classifier is good
    text = (tmp_path / "pub" / "docs" / "results.md").read_text()
    assert digits["report"].SECTION in text and "(a) k = 0.1 vs k = 0" in text
    assert (tmp_path / "pub" / "docs" / "img" / "digits_smoke_k0.1.png").stat().st_size > 0
    assert (tmp_path / "runs" / "k0.1-s2" / "checkpoints" / "latest").is_file()
