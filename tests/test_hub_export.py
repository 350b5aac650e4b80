"""`xdlm export`: a run -> a self-describing HF repo, and back into `sample` (offline)."""

from __future__ import annotations

import json

import pytest
import torch

import xdlm.train.checkpoint as checkpoint
from xdlm import runs
from xdlm.builders import build_model
from xdlm.cli import main
from xdlm.commands.sample import sample_from_run
from xdlm.config import XDLMConfig
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import LogLinear, schedule_spec
from xdlm.data.tokenizers import load_tokenizer
from xdlm.models.ema import EMA
from xdlm.runs import is_export, resolve_model_path

TEXT = "It is a truth universally acknowledged, that a single man in possession of a fortune."


@pytest.fixture
def run_dir(tmp_path):
    """A saved run: char tokenizer, tiny DiT (k = 0.1), an EMA unlike the raw weights, a
    training-time validation record and an `xdlm eval` report."""
    tok = load_tokenizer("char", corpus_texts=[TEXT])
    cfg = XDLMConfig()
    cfg.data.seq_len, cfg.data.path = 16, "data/austen"
    cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads = 1, 32, 2
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size)
    ema = EMA(model)
    for shadow in ema.shadow.values():
        shadow.add_(0.05 * torch.randn_like(shadow))
    kern = MixedKernel(tok.vocab_size, tok.mask_id, 0.1)
    meta = {"kernel": kern.spec(), "schedule": schedule_spec(LogLinear()), "config": cfg.to_dict()}
    run = tmp_path / "run"
    checkpoint.save_checkpoint(
        run, 5, model=model, ema_state=ema.state_dict(), train_state={}, meta=meta
    )
    tok.save(run / "tokenizer")
    valid = {"step": 5, "valid_nats_per_token": 3.25, "valid_se_nats_per_token": 0.07,
             "valid_ppl": 25.8, "valid_tokens": 640, "valid_rows": 10}  # fmt: skip
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "loss": 3.5}) + "\n" + json.dumps(valid)
    )
    continuous = {"nats_per_token": 3.2, "bits_per_token": 4.6, "ppl": 24.5,
                  "se_nats_per_token": 0.05, "ci95_nats_per_token": [3.1, 3.3],
                  "ci95_ppl": [22.2, 27.1], "tokens": 1280, "sequences": 20}  # fmt: skip
    report = {"step": 5, "likelihood": {"data": "data/austen", "split": "valid",
                                        "continuous": continuous}}  # fmt: skip
    (run / "eval.json").write_text(json.dumps(report))
    return run


def _logits(loaded, x):
    with torch.no_grad():
        return loaded.model(x, torch.full((x.shape[0],), 0.5))


def test_export_writes_a_self_describing_repo(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert "state.pt" not in names and is_export(out)
    config = json.loads((out / "config.json").read_text())
    tok = runs.load_run(run_dir).tokenizer
    assert config["kernel"] == {
        "vocab_size": tok.vocab_size, "mask_id": tok.mask_id, "k": 0.1, "use_mask": True,
        "schedule": schedule_spec(LogLinear()),
    }  # fmt: skip
    assert config["special_token_ids"] == tok.special_ids and config["weights"] == "ema"
    assert config["architecture"]["n_layers"] == 1 and config["training"]["steps"] == 5
    card = (out / "README.md").read_text()
    assert "3.2000 ± 0.0500 nats/token" in card and "[3.1000, 3.3000]" in card
    assert "(valid split, 20 rows, 1280 tokens), step 5: NELBO 3.2000" in card
    assert ("validation at step 5 (the `xdlm eval` estimator on the first 10 rows of the valid "
            "split, 640 tokens): NELBO 3.2500 ± 0.0700 nats/token (SE)") in card  # fmt: skip
    assert "data/austen" in card and "training steps: 5" in card and "xdlm sample" in card
    assert main(["export", str(run_dir), str(out)]) == 2  # not empty: refuse
    assert "--overwrite" in capsys.readouterr().err


def test_export_sample_round_trip_reads_weights_only(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "export"
    main(["export", str(run_dir), str(out)])

    def no_pickle(*args, **kwargs):
        raise AssertionError("inference must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_pickle)
    from_run, from_export = runs.load_run(run_dir), runs.load_run(out)
    raw = runs.load_run(run_dir, use_ema=False)
    x = torch.randint(
        0, from_run.kernel.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(_logits(from_run, x), _logits(from_export, x))  # the EMA weights
    assert not torch.allclose(_logits(raw, x), _logits(from_export, x))
    assert from_export.kernel.spec() == from_run.kernel.spec() and from_export.step == 5
    a = sample_from_run(run_dir, steps=4, num_samples=2, seed=3, prompt="It")
    b = sample_from_run(out, steps=4, num_samples=2, seed=3, prompt="It")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    jsonl = tmp_path / "s.jsonl"
    argv = ["--steps", "4", "--num-samples", "2", "--seed", "3", "--prompt", "It"]
    assert main(["sample", "--ckpt", str(out), *argv, "--out", str(jsonl)]) == 0  # the CLI too
    assert [json.loads(x)["tokens"] for x in jsonl.read_text().splitlines()] == [
        r["tokens"] for r in a
    ]


def test_hub_id_is_downloaded(run_dir, tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    out = tmp_path / "export"
    main(["export", str(run_dir), str(out)])
    calls = []
    monkeypatch.setattr(hf, "snapshot_download", lambda repo: calls.append(repo) or str(out))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("someone/xdlm-austen") == out and calls == ["someone/xdlm-austen"]
    assert runs.load_run("someone/xdlm-austen").step == 5
    assert resolve_model_path("export") == out.relative_to(tmp_path)  # local paths stay local


def test_card_states_the_data_trained_on_and_commands_that_work(tiny_corpus, tmp_path, capsys):
    """Issue 32.5: the card listed the recipe's `sources: ['embedded:austen']` for a model
    trained on other prepared data, `pip install xdlm` (not on PyPI) and `--ckpt xdlm`."""
    from run_fixtures import tiny_cfg

    from xdlm.data import prepare
    from xdlm.data.manifest import sha256_file
    from xdlm.train.loop import train

    data = tmp_path / "data"
    prepare([tiny_corpus], data, tokenizer="char", seq_len=32)
    # the recipe still names the embedded novel; data.path holds other, prepared data
    train(tiny_cfg(tiny_corpus, data, "data.sources=[embedded:austen]"), tmp_path / "run")
    out = tmp_path / "hub" / "xdlm-tiny"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    card = (out / "README.md").read_text()
    sha = sha256_file(data / "manifest.json")
    assert (
        f"`{data}` (prepared from {tiny_corpus}; L = 32; wrap; manifest.json SHA-256 {sha})" in card
    )
    assert "embedded:austen" not in card and "\npip install xdlm" not in card
    assert "pip install -e ." in card and "not on PyPI" in card
    (command,) = [x for x in card.splitlines() if x.startswith("xdlm sample")]
    argv = command.split("#")[0].split()[1:]
    assert argv[-2:] == ["--ckpt", str(out)] and "--push-to-hub ORG/NAME: xdlm sample" in card
    capsys.readouterr()
    assert main([*argv, "--steps", "2", "--num-samples", "1"]) == 0  # the card's command runs


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_get_the_mode_of_new_files(run_dir, tmp_path, umask):
    """Regression: model.safetensors was 0600 (safetensors' own mode) beside 0644 files."""
    import os

    old = os.umask(umask)
    try:
        out = tmp_path / "export"
        assert main(["export", str(run_dir), str(out)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_card_says_an_old_validation_is_not_comparable_with_eval():
    """Runs from before validation used the `xdlm eval` estimator: one fixed noise draw."""
    from xdlm.hub import _metric_lines

    old = {"step": 5, "valid_nats_per_token": 3.25, "valid_ppl": 25.8, "valid_tokens": 640}
    (line,) = _metric_lines({"eval": None, "validation": old})
    assert "3.2500 nats/token on 640 tokens" in line and "not comparable with `xdlm eval`" in line
