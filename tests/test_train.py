"""Training loop, config, checkpoints: loss falls, resume == uninterrupted, every bad input."""

import gzip
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from xdlm.cli import main as cli_main
from xdlm.config import load_config
from xdlm.data.corpora import embedded_corpus_path
from xdlm.runs import find_checkpoint, load_run, read_meta, read_run_config
from xdlm.train import loop as loop_mod
from xdlm.train.loop import NonFiniteLossError, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first ~120 KB of the embedded corpus as a local text file (real English)."""
    text = gzip.open(embedded_corpus_path(), "rt").read()[:120_000]
    path = tmp_path_factory.mktemp("corpus") / "austen.txt"
    path.write_text(text)
    return path


def tiny_cfg(corpus, data_dir, *extra):
    sets = [
        f"data.path={data_dir}", f"data.sources=[{corpus}]", "data.tokenizer=char",
        "data.seq_len=32", "data.batch_size=8", "model.preset=tiny", "model.n_layers=2",
        "model.d_model=64", "model.n_heads=2", "train.steps=6", "train.warmup_steps=2",
        "train.log_every=1", "train.eval_every=3", "train.eval_batches=2", "train.save_every=3",
        "train.lr=3e-3", "train.ema_decay=0.9", *extra,
    ]  # fmt: skip
    return load_config(None, sets)


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_config_errors_name_key_and_valid_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'train.stepz'.*'steps'"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ValueError, match="'train.steps' expects int, got 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config(None, ["train.steps"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    cfg = load_config("configs/quickstart.yaml", ["kernel.k=0", "train.lr=1e-3"])
    assert cfg.kernel.k == 0.0 and isinstance(cfg.kernel.k, float) and cfg.model.n_layers == 4


def test_loss_falls_on_real_text(corpus, tmp_path):
    cfg = tiny_cfg(
        corpus, tmp_path / "data", "train.steps=60", "train.eval_every=60", "train.save_every=60"
    )
    result = train(cfg, tmp_path / "run")
    curve = losses(tmp_path / "run")
    first = sum(curve[s] for s in range(1, 6)) / 5
    last = sum(curve[s] for s in range(56, 61)) / 5
    assert last < first - 0.5, (first, last)
    assert result.valid["valid_nats_per_token"] < first
    loaded = load_run(tmp_path / "run")
    assert loaded.step == 60 and loaded.kernel.k == 0.1 and loaded.tokenizer is not None


def test_resume_equals_uninterrupted(corpus, tmp_path):
    straight = train(tiny_cfg(corpus, tmp_path / "data"), tmp_path / "a")
    short = tiny_cfg(corpus, tmp_path / "data", "train.steps=3")
    train(short, tmp_path / "b")
    resumed = train(tiny_cfg(corpus, tmp_path / "data"), tmp_path / "b", resume=True)
    assert straight.step == resumed.step == 6
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [la[s] for s in (4, 5, 6)] == [lb[s] for s in (4, 5, 6)]
    wa = load_run(tmp_path / "a", use_ema=False).model.state_dict()
    wb = load_run(tmp_path / "b", use_ema=False).model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _valid_at(run_dir, step):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["valid_nats_per_token"] for r in rows if r["step"] == step and "valid_ppl" in r)


def test_resume_in_a_later_epoch_with_dropout_restores_everything(corpus, tmp_path):
    """Cut at step 4 of 8 with 3 batches per epoch (epoch 1, batch 1) and dropout 0.2: losses,
    raw weights, EMA weights and the validation NELBO equal the uninterrupted run's. Catches a
    loader that forgets its epoch, an unrestored dropout (torch) RNG and an unloaded EMA."""
    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text()[:1500])  # ~46 rows of 32 chars: 32 train, 14 valid
    sets = ["data.valid_fraction=0.3", "model.dropout=0.2", "train.steps=8", "train.precision=fp32",
            "train.eval_every=4", "train.save_every=4"]  # fmt: skip
    cfg = lambda *x: tiny_cfg(small, tmp_path / "data", *sets, *x)  # noqa: E731
    straight = train(cfg(), tmp_path / "a")
    train(cfg("train.steps=4"), tmp_path / "b")
    trainer = loop_mod.Trainer(cfg(), tmp_path / "b", resume=True)
    assert len(trainer.loader) == 3  # batches per epoch: the cut at step 4 is in epoch 1
    resumed = trainer.run()
    assert straight.step == resumed.step == 8
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [la[s] for s in range(5, 9)] == [lb[s] for s in range(5, 9)]
    for use_ema in (False, True):
        wa = load_run(tmp_path / "a", use_ema=use_ema).model.state_dict()
        wb = load_run(tmp_path / "b", use_ema=use_ema).model.state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"weights differ (use_ema={use_ema})"
    assert _valid_at(tmp_path / "a", 8) == _valid_at(tmp_path / "b", 8)
    assert straight.valid == resumed.valid


def test_existing_run_needs_resume_and_matching_kernel(corpus, tmp_path):
    cfg = tiny_cfg(corpus, tmp_path / "data", "train.steps=3")
    train(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, tmp_path / "run")
    other = tiny_cfg(corpus, tmp_path / "data", "kernel.k=0")
    with pytest.raises(ValueError, match="trained with kernel"):
        train(other, tmp_path / "run", resume=True)


def test_bad_data_inputs(corpus, tmp_path):
    with pytest.raises(FileNotFoundError):
        train(load_config(None, [f"data.path={tmp_path / 'missing'}"]), tmp_path / "r1")
    cfg = tiny_cfg(corpus, tmp_path / "data", "train.steps=1")
    train(cfg, tmp_path / "r0")  # prepares data with seq_len 32
    with pytest.raises(ValueError, match="seq_len=32"):
        train(tiny_cfg(corpus, tmp_path / "data", "data.seq_len=64"), tmp_path / "r2")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(tiny_cfg(corpus, tmp_path / "data", "data.batch_size=100000"), tmp_path / "r3")


def test_nan_steps_are_skipped_then_stop(corpus, tmp_path, monkeypatch):
    real = loop_mod.diffusion_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        return type(out)(out.nats * float("nan"), out.tokens, out.per_token, out.t, out.z_t)

    monkeypatch.setattr(loop_mod, "diffusion_loss", nan_loss)
    cfg = tiny_cfg(corpus, tmp_path / "data", "train.max_nan_steps=2", "train.eval_batches=0")
    with pytest.raises(NonFiniteLossError, match="3 steps had a non-finite loss"):
        train(cfg, tmp_path / "run")


@pytest.mark.parametrize("speedup, expected", [(0.5, "fp32"), (3.0, "bf16")])
def test_auto_precision_times_the_training_step_and_is_logged_first(
    corpus, tmp_path, monkeypatch, capsys, speedup, expected
):
    from xdlm import precision_probe

    monkeypatch.setenv("XDLM_CACHE_DIR", str(tmp_path / "cache"))
    steps = []

    def measure(step):  # the step is the run's own training step: it leaves gradients clean
        step()
        steps.append(step)
        return [speedup] * 5

    monkeypatch.setattr(precision_probe, "measure", measure)
    used = []
    real_step = loop_mod.Trainer.train_step

    def spy(self):
        used.append(self.precision.name)
        return real_step(self)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", spy)
    cfg = tiny_cfg(corpus, tmp_path / "data", "train.steps=1", "train.eval_batches=0")
    capsys.readouterr()
    train(cfg, tmp_path / "run")
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"precision {expected} (bf16 ran the train step of DiT d=")
    assert f"at {speedup:.2f}x fp32's speed (median of 5 rounds)" in first
    assert used == [expected] and len(steps) == 1
    monkeypatch.setattr(precision_probe, "measure", lambda step: [1 / speedup] * 5)
    resumed = tiny_cfg(corpus, tmp_path / "data", "train.steps=2", "train.eval_batches=0")
    assert train(resumed, tmp_path / "run", resume=True).step == 2 and used[-1] == expected
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"precision {expected} (kept from the run's checkpoint step_0000001)"
    explicit = tiny_cfg(
        corpus, tmp_path / "data", "train.steps=3", "train.eval_batches=0", "train.precision=fp32"
    )
    assert train(explicit, tmp_path / "run", resume=True).step == 3 and used[-1] == "fp32"


def test_validation_is_xdlm_evals_number_on_its_rows(tiny_run, tmp_path):
    """Regression (issue 32): in-loop validation said 6.676 nats/token and `xdlm eval` 6.879 ±
    0.038 for one run: the loop drew one fixed noise (one t per row, no error bar; its spread
    over noise seeds was ±0.19 on a tiny run) on the first rows only. Now it is the eval
    estimator with its SE: on the same rows, weights and precision the numbers are equal."""
    rows = (tiny_run / "run" / "metrics.jsonl").read_text().splitlines()
    valid = next(r for r in map(json.loads, rows) if r["step"] == 4 and "valid_rows" in r)
    assert valid["valid_rows"] == 8 and valid["valid_se_nats_per_token"] > 0  # 1 batch of 8
    out = tmp_path / "eval.json"
    args = ["--max-batches", "2", "--batch-size", "4", "--precision", "fp32", "--out", str(out)]
    assert cli_main(["eval", "--ckpt", str(tiny_run / "run"), *args]) == 0
    report = json.loads(out.read_text())
    c = report["likelihood"]["continuous"]
    assert report["step"] == 4 and c["sequences"] == 8 and c["tokens"] == valid["valid_tokens"]
    assert c["nats_per_token"] == pytest.approx(valid["valid_nats_per_token"], rel=1e-6)
    assert c["se_nats_per_token"] == pytest.approx(valid["valid_se_nats_per_token"], rel=1e-5)


def test_kill_during_save_keeps_previous_checkpoint(corpus, tmp_path):
    train(tiny_cfg(corpus, tmp_path / "data", "train.steps=3"), tmp_path / "run")
    script = textwrap.dedent(f"""
        import os, signal, torch
        from xdlm.train import checkpoint
        from xdlm.config import load_config
        from xdlm.train.loop import Trainer
        cfg = load_config({str(tmp_path / "run" / "config.yaml")!r}, ["train.steps=6"])
        trainer = Trainer(cfg, {str(tmp_path / "run")!r}, resume=True)
        trainer.state.step = 5
        def die(*a, **k):  # SIGKILL in the middle of writing the new checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.torch.save = die
        trainer.save()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert find_checkpoint(tmp_path / "run").name == "step_0000003"
    assert load_run(tmp_path / "run").step == 3
    assert train(tiny_cfg(corpus, tmp_path / "data"), tmp_path / "run", resume=True).step == 6


def test_cli_prepare_and_train(corpus, tmp_path, capsys):
    data = tmp_path / "prepared"
    assert (
        cli_main(
            ["prepare", str(corpus), "--out", str(data), "--tokenizer", "char", "--seq-len", "32"]
        )
        == 0
    )
    assert "train:" in capsys.readouterr().out
    rc = cli_main(
        [
            "train",
            "--out",
            str(tmp_path / "run"),
            "--no-samples",
            "--set",
            f"data.path={data}",
            "--set",
            "data.tokenizer=char",
            "--set",
            "data.seq_len=32",
            "--set",
            "data.batch_size=8",
            "--set",
            "model.d_model=64",
            "--set",
            "model.n_heads=2",
            "--set",
            "train.steps=2",
            "--set",
            "train.eval_batches=1",
        ]
    )
    assert rc == 0 and (tmp_path / "run" / "config.yaml").is_file()
    assert cli_main(["train", "--out", str(tmp_path / "x"), "--set", "bogus.key=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err


def test_fused_loss_trains_like_the_unfused_loss(corpus, tmp_path):
    exact = ("train.steps=3", "train.precision=fp32")  # bf16 rounds the two paths differently
    plain = train(tiny_cfg(corpus, tmp_path / "data", *exact), tmp_path / "plain")
    fused = train(
        tiny_cfg(corpus, tmp_path / "data", *exact, "train.fused_loss=true"),
        tmp_path / "fused",
    )
    la, lb = losses(tmp_path / "plain"), losses(tmp_path / "fused")
    assert [la[s] for s in (1, 2, 3)] == pytest.approx([lb[s] for s in (1, 2, 3)], rel=1e-5)
    assert plain.step == fused.step == 3


def test_ema_can_be_turned_off(corpus, tmp_path):
    result = train(
        tiny_cfg(corpus, tmp_path / "data", "train.ema_decay=0", "train.steps=3"), tmp_path / "run"
    )
    assert result.step == 3 and result.valid is not None
    assert not (find_checkpoint(tmp_path / "run") / "ema.safetensors").exists()
    assert load_run(tmp_path / "run").step == 3


@pytest.mark.parametrize(
    "name", ["quickstart", "cpu_wiki", "owt_small", "lm1b_small", "mnist", "hf_tiny", "llada_xdlm"]
)
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert 0.0 <= cfg.kernel.k <= 1.0 and cfg.train.steps > 0


def _tiny_sets(corpus, data_dir, *extra):
    sets = [
        f"data.path={data_dir}", f"data.sources=[{corpus}]", "data.tokenizer=char",
        "data.seq_len=32", "data.batch_size=8", "model.n_layers=1", "model.d_model=32",
        "model.n_heads=2", "train.warmup_steps=1", "train.eval_batches=1", "train.save_every=3",
        "train.precision=fp32", "train.steps=3", *extra,
    ]  # fmt: skip
    return [x for s in sets for x in ("--set", s)]


def test_resume_keeps_the_saved_config_and_never_rewrites_it(corpus, tmp_path, capsys):
    """Regression: --resume rebuilt the config from the command line (fp32 silently became
    auto) and rewrote config.yaml. Now it continues with the saved settings, exactly."""
    run = tmp_path / "run"
    assert (
        cli_main(["train", "--out", str(run), "--no-samples", *_tiny_sets(corpus, tmp_path / "d")])
        == 0
    )
    saved_yaml = (run / "config.yaml").read_text()
    saved = read_run_config(run)
    capsys.readouterr()
    assert cli_main(["train", "--out", str(run), "--resume", "--no-samples"]) == 0
    out = capsys.readouterr().out
    assert "resume: the run's saved config\n" in out and " -> " not in out
    assert read_run_config(run) == saved and saved.train.precision == "fp32"
    assert (run / "config.yaml").read_text() == saved_yaml
    argv = ["train", "--out", str(run), "--resume", "--no-samples", "--set", "train.steps=4"]
    assert cli_main(argv) == 0
    assert "resume: train.steps: 3 -> 4" in capsys.readouterr().out
    latest = read_run_config(run)
    assert latest.train.steps == 4 and latest.train.precision == "fp32"
    assert read_meta(find_checkpoint(run))["precision"]["name"] == "fp32"
    assert (run / "config.yaml").read_text() == saved_yaml  # history: the config it started with
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 3, "changes": {"train.steps": [3, 4]}} in events


def test_resume_of_a_missing_run_and_a_missing_explicit_data_path_are_errors(
    corpus, tmp_path, capsys
):
    assert cli_main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err and not (tmp_path / "none").exists()
    argv = ["train", "--config", "configs/quickstart.yaml", "--out", str(tmp_path / "r")]
    assert cli_main([*argv, "--set", f"data.path={tmp_path / 'typo'}"]) == 2
    assert "no prepared dataset" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()  # the recipe's sources were not prepared there
