"""`xdlm eval` end to end with a monkeypatched checkpoint loader, and the sampling sweep."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from eval_toys import WORDS, Toy, tiny_scorer

import xdlm
from xdlm import MixedKernel, make_schedule
from xdlm.cli import main
from xdlm.config import XDLMConfig
from xdlm.data import prepare
from xdlm.eval.genquality import load_scorer
from xdlm.eval.sweep import SamplingSetting, plot_sweep, sweep

TEXT = "\n\n".join(" ".join(WORDS[i % 5 :] + WORDS[: i % 5]) for i in range(40))


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A prepared dataset and a fake `load_run` returning a toy model on its tokenizer."""
    (tmp_path / "c.txt").write_text(TEXT)
    man = prepare([tmp_path / "c.txt"], tmp_path / "data", tokenizer="char", seq_len=16)
    from xdlm.data import load_tokenizer_dir

    tok = load_tokenizer_dir(tmp_path / "data" / "tokenizer")
    loaded = SimpleNamespace(
        model=Toy(man.vocab_size), kernel=MixedKernel(man.vocab_size, man.mask_id, 0.1),
        schedule=make_schedule("loglinear"), tokenizer=tok, step=7,
        config=SimpleNamespace(train=SimpleNamespace(t_min=1e-3), data=SimpleNamespace(seq_len=16)),
        checkpoint=tmp_path / "run" / "checkpoints" / "step_0000007",
    )  # fmt: skip
    calls = []

    def fake_load(path, device="cpu", use_ema=True, trust_remote_code=False):
        calls.append(use_ema)
        return loaded

    monkeypatch.setattr("xdlm.runs.load_run", fake_load)
    saved = XDLMConfig()
    saved.data.path = str(tmp_path / "data")  # the run's own data
    monkeypatch.setattr("xdlm.runs.read_run_config", lambda path, trust=False: saved)
    monkeypatch.setattr("xdlm.eval.genquality.load_scorer", lambda name, device: tiny_scorer())
    return tmp_path, calls, saved


def test_eval_likelihood_discrete_and_zero_shot(run_dir, capsys):
    tmp, calls, _ = run_dir
    out = tmp / "e.json"
    rc = main(["eval", "--ckpt", str(tmp / "run"), "--data", str(tmp / "data"),
               "--t-samples", "2", "--quadrature", "--discrete-T", "2", "4",
               "--zero-shot", str(tmp / "c.txt"), "--max-tokens", "32",
               "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    err = capsys.readouterr().err  # regression: eval ran for minutes without any progress
    assert "NELBO" in err and "discrete T=4" in err and "zero-shot c.txt" in err
    assert rc == 0 and calls == [True]
    assert report["xdlm_version"] == xdlm.__version__ and report["seed"] == 0
    lik = report["likelihood"]
    assert lik["settings"]["method"] == "gauss-legendre" and lik["data"] == str(tmp / "data")
    assert set(lik["discrete"]) == {"2", "4"} and lik["continuous"]["ppl"] > 1
    corpus = report["zero_shot"]["corpora"][str(tmp / "c.txt")]
    assert corpus["tokens"] == 32 and corpus["rules"]["mode"] == "wrap"


def test_eval_gen_ppl_sweep_writes_table_and_plot(run_dir):
    tmp, _, _ = run_dir
    rc = main(["eval", "--ckpt", str(tmp / "run"), "--gen-ppl", "--steps", "2", "4",
               "--top-p", "1.0", "0.9", "--num-samples", "3", "--batch-size", "2",
               "--plot", str(tmp / "p.png"), "--no-ema"])  # fmt: skip
    report = json.loads((tmp / "run" / "eval.json").read_text())
    rows = report["generation"]["rows"]
    assert rc == 0 and report["ema"] is False and len(rows) == 4
    assert {(r["steps"], r["top_p"]) for r in rows} == {(2, None), (4, None), (2, 0.9), (4, 0.9)}
    assert all(r["samples"] == 3 and r["nfe"] > 0 and r["gen_ppl"] > 1 for r in rows)
    assert Path(report["generation"]["plot"]).stat().st_size > 1000


def test_eval_without_a_task_uses_the_runs_own_validation_split(run_dir, capsys):
    tmp, _, saved = run_dir
    assert main(["eval", "--ckpt", str(tmp / "run"), "--t-samples", "1"]) == 0
    report = json.loads((tmp / "run" / "eval.json").read_text())
    assert report["likelihood"]["data"] == str(tmp / "data")
    assert (
        report["likelihood"]["split"] == "valid" and report["likelihood"]["continuous"]["ppl"] > 1
    )
    assert main(["eval", "--ckpt", str(tmp / "run"), "--split", "test"]) == 2
    assert "has no 'test' split" in capsys.readouterr().err
    saved.data.path = str(tmp / "elsewhere")
    assert main(["eval", "--ckpt", str(tmp / "run")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_sweep_cells_are_paired_by_seed(tmp_path):
    """Every cell restarts from `seed`: two cells that differ only by a no-op filter (top-p 1) or
    repeat a T give identical rows, and a cell equals a direct `generate` + `sample_quality`."""
    import torch

    from xdlm.data import load_tokenizer
    from xdlm.eval.genquality import sample_quality
    from xdlm.sampling import generate

    tok = load_tokenizer("char", corpus_texts=[TEXT])
    kern, sched = MixedKernel(tok.vocab_size, tok.mask_id, 0.5), make_schedule("loglinear")
    model, scorer = Toy(tok.vocab_size), tiny_scorer()
    settings = [SamplingSetting(1.0, None), SamplingSetting(1.0, 1.0)]
    rows = sweep(model, kern, sched, tok, scorer, steps=[2, 3, 2], settings=settings,
                 num_samples=3, seq_len=8, batch_size=2, seed=5)  # fmt: skip
    metrics = [{k: v for k, v in r.items() if k not in ("top_p", "wall_time")} for r in rows]
    assert metrics[0] == metrics[2] == metrics[3] == metrics[5] and metrics[1] == metrics[4]
    assert metrics[0]["nfe"] > 0 and metrics[0]["samples"] == 3
    gen = torch.Generator().manual_seed(5)
    direct = torch.cat([
        generate(model, kern, sched, batch_size=b, seq_len=8, steps=3, generator=gen).tokens
        for b in (2, 1)
    ])  # fmt: skip
    want = sample_quality(direct, tok, scorer)
    assert {k: rows[1][k] for k in want} == want
    assert metrics[0] != metrics[1]  # T matters, so the comparison above is not vacuous
    assert plot_sweep(rows, tmp_path / "s.png").is_file()


def test_gen_ppl_checks_its_scorer_before_any_likelihood(run_dir, monkeypatch, capsys):
    """Regression (issue 32.2): without transformers, `--data D --gen-ppl` evaluated the
    likelihood for 107 s and then died with a raw ModuleNotFoundError."""
    import importlib.util

    tmp, calls, _ = run_dir
    monkeypatch.setattr("xdlm.eval.genquality.load_scorer", load_scorer)  # the real one
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "transformers" else find_spec(name, *a),
    )

    def never(*args, **kwargs):
        raise AssertionError("the likelihood ran before the scorer was checked")

    monkeypatch.setattr("xdlm.eval.likelihood.evaluate_split", never)
    argv = ["eval", "--ckpt", str(tmp / "run"), "--data", str(tmp / "data"), "--gen-ppl"]
    assert main(argv) == 2 and calls == []  # the run was not even loaded
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "needs transformers" in err and 'pip install -e ".[eval]"' in err
