"""Which value wins (issue 29): the run's saved config < `--config FILE` < shorthand flags <
`--set`, through the real `xdlm sample` on a trained tiny run; the run's recommendation wins
over the schema's default, an explicit `--seq-len` over the run's training length."""

from __future__ import annotations

import json

import pytest

from xdlm.cli import main
from xdlm.run_checks import with_digest
from xdlm.runs import find_checkpoint

FAST = ["--steps", "2", "--num-samples", "1"]


def _sample(run, tmp_path, *argv) -> dict:
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--ckpt", str(run), *FAST, "--out", str(out), *argv]) == 0
    return json.loads(out.read_text().splitlines()[0])


@pytest.fixture
def recommending_run(run_copy):
    """The tiny run whose saved `sample` section (its checkpoint's meta.json) recommends
    temperature 0.5 and the raw weights."""
    path = find_checkpoint(run_copy) / "meta.json"
    meta = json.loads(path.read_text())
    meta["config"]["sample"].update(temperature=0.5, use_ema=False)
    path.write_text(json.dumps(with_digest(meta)))  # as the run had been saved so
    return run_copy


@pytest.mark.parametrize(
    ("argv", "temperature"),
    [
        ([], 0.5),  # the run's recommendation over the schema's default
        (["--config", "FILE"], 0.6),
        (["--config", "FILE", "--temperature", "0.7"], 0.7),
        (["--temperature", "0.7", "--config", "FILE"], 0.7),  # the order typed does not matter
        (["--config", "FILE", "--temperature", "0.7", "--set", "sample.temperature=0.8"], 0.8),
        (["--set", "sample.temperature=0.8", "--temperature", "0.7"], 0.8),
    ],
)
def test_each_layer_wins_over_the_ones_below(recommending_run, tmp_path, argv, temperature):
    (tmp_path / "f.yaml").write_text("sample:\n  temperature: 0.6\n")
    argv = [str(tmp_path / "f.yaml") if a == "FILE" else a for a in argv]
    assert _sample(recommending_run, tmp_path, *argv)["settings"]["temperature"] == temperature


def test_use_ema_from_the_run_then_the_file_then_no_ema(recommending_run, tmp_path):
    (tmp_path / "f.yaml").write_text("sample:\n  use_ema: true\n")
    f = str(tmp_path / "f.yaml")
    raw = _sample(recommending_run, tmp_path)
    ema = _sample(recommending_run, tmp_path, "--config", f)
    flag = _sample(recommending_run, tmp_path, "--config", f, "--no-ema")
    assert [r["settings"]["use_ema"] for r in (raw, ema, flag)] == [False, True, False]
    assert raw["tokens"] == flag["tokens"]  # same seed, same (raw) weights


def test_seq_len_flag_wins_over_the_training_length(run_copy, tmp_path):
    assert len(_sample(run_copy, tmp_path)["tokens"]) == 32  # the run's data.seq_len
    assert len(_sample(run_copy, tmp_path, "--seq-len", "8")["tokens"]) == 8
    assert len(_sample(run_copy, tmp_path, "--set", "sample.seq_len=9")["tokens"]) == 9
