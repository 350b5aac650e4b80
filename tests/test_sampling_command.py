"""`xdlm sample`: flags, JSONL / HTML outputs, fixed prompt and infilling, a real checkpoint."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import xdlm.runs as runs
import xdlm.train.checkpoint as checkpoint
from xdlm.builders import build_model
from xdlm.cli import main
from xdlm.config import XDLMConfig
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import LogLinear, schedule_spec
from xdlm.data.tokenizers import load_tokenizer

TEXT = "It is a truth universally acknowledged, that a single man in possession of a fortune."


def _config(seq_len: int = 24, num_classes: int = 0) -> XDLMConfig:
    cfg = XDLMConfig()
    cfg.data.seq_len = seq_len
    cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads = 1, 32, 2
    cfg.model.num_classes = num_classes
    return cfg


@pytest.fixture
def fake_run(monkeypatch):
    """A tiny untrained char-level DiT behind `load_run` (k = 0.1)."""
    tok = load_tokenizer("char", corpus_texts=[TEXT])
    cfg = _config(num_classes=2)
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size).eval()
    loaded = SimpleNamespace(
        model=model, kernel=MixedKernel(tok.vocab_size, tok.mask_id, 0.1), schedule=LogLinear(),
        tokenizer=tok, config=cfg, step=7,
    )  # fmt: skip
    calls = []
    monkeypatch.setattr(runs, "load_run", lambda *a, **kw: calls.append(kw) or loaded)
    monkeypatch.setattr(runs, "read_run_config", lambda path, trust=False: cfg)
    return SimpleNamespace(tok=tok, calls=calls, loaded=loaded)


def test_sample_writes_jsonl_and_trace(fake_run, tmp_path, capsys):
    out, trace = tmp_path / "s.jsonl", tmp_path / "t.html"
    argv = [
        "sample",
        "--ckpt",
        "RUN",
        "--steps",
        "4",
        "--num-samples",
        "3",
        "--batch-size",
        "2",
        "--top-p",
        "0.9",
        "--seed",
        "5",
        "--out",
        str(out),
        "--trace",
        str(trace),
        "--no-ema",
    ]
    assert main(argv) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2]
    assert all(len(r["tokens"]) == 24 and isinstance(r["text"], str) for r in lines)
    assert lines[0]["settings"]["top_p"] == 0.9 and lines[0]["seed"] == 5
    assert lines[0]["nfe"] <= 5 and lines[0]["checkpoint_step"] == 7
    assert fake_run.calls[0]["use_ema"] is False
    assert fake_run.calls[0]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "<svg" in trace.read_text()
    printed = capsys.readouterr().out
    assert "3 samples" in printed and "NFE" in printed and "2 batch(es)" in printed


@pytest.mark.parametrize(
    "sampler",
    [
        ["ancestral"],
        ["confidence"],
        ["xdm", "--xdm-protect-prompt"],
        ["pc", "--pc-eta", "0.7"],
        ["threshold", "--threshold", "0.5"],
        ["dilated", "--grid", "doubling"],
        ["dilated", "--grid", "doubling", "--t-end", "0.25"],
    ],
)
def test_prompt_and_infill_stay_fixed(fake_run, tmp_path, sampler):
    tok = fake_run.tok
    out = tmp_path / "p.jsonl"
    base = ["sample", "--ckpt", "RUN", "--steps", "3", "--num-samples", "2", "--sampler", *sampler]
    assert main([*base, "--prompt", "It is", "--out", str(out)]) == 0
    prompt = [tok.bos_id, *tok.encode("It is")]
    for r in map(json.loads, out.read_text().splitlines()):
        assert r["tokens"][: len(prompt)] == prompt
    assert main([*base, "--infill", "a [BLANK:3] man", "--seq-len", "20", "--out", str(out)]) == 0
    for r in map(json.loads, out.read_text().splitlines()):
        t = r["tokens"]
        assert t[:3] == [tok.bos_id, *tok.encode("a ")] and t[6:10] == tok.encode(" man")


def test_hf_runs_default_to_the_xdm_sampler(fake_run, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    argv = ["sample", "--ckpt", "RUN", "--steps", "4", "--num-samples", "2", "--prompt", "It is"]
    fake_run.loaded.config.model.backbone = "hf"  # an HF (LLaDA-style) run
    assert main([*argv, "--block-size", "9", "--out", str(out)]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    settings = records[0]["settings"]
    assert settings["sampler"] == "xdm" and settings["temperature"] == 0.0
    assert records[0]["nfe"] == 4 and "sampler=xdm" in capsys.readouterr().out
    assert all(fake_run.tok.mask_id not in r["tokens"] for r in records)
    assert main([*argv, "--block-size", "7"]) == 2
    assert "divides" in capsys.readouterr().err
    fake_run.loaded.config.model.backbone = "dit"
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["settings"]["sampler"] == "ancestral"


def test_semi_ar_and_guidance_flags(fake_run, tmp_path):
    out = tmp_path / "g.jsonl"
    argv = [
        "sample",
        "--ckpt",
        "RUN",
        "--steps",
        "2",
        "--num-samples",
        "1",
        "--seq-len",
        "40",
        "--block-size",
        "16",
        "--class-label",
        "1",
        "--guidance",
        "1.5",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    (rec,) = map(json.loads, out.read_text().splitlines())
    assert len(rec["tokens"]) == 40 and rec["nfe"] % 2 == 0


def test_user_errors(fake_run, capsys):
    assert main(["sample", "--ckpt", "R", "--seq-len", "40"]) == 2
    assert "--block-size" in capsys.readouterr().err
    assert main(["sample", "--ckpt", "R", "--guidance", "1"]) == 2
    assert "--class-label" in capsys.readouterr().err


def test_real_checkpoint_round_trip(tmp_path):
    """The `load_run` contract: a saved run directory samples end to end."""
    tok = load_tokenizer("char", corpus_texts=[TEXT])
    cfg = _config(seq_len=16)
    kern = MixedKernel(tok.vocab_size, tok.mask_id, 0.1)
    model = build_model(cfg.model, tok.vocab_size)
    meta = {"kernel": kern.spec(), "schedule": schedule_spec(LogLinear()), "config": cfg.to_dict()}
    checkpoint.save_checkpoint(tmp_path, 3, model=model, ema_state=None, train_state={}, meta=meta)
    tok.save(tmp_path / "tokenizer")
    from xdlm.commands.sample import sample_from_run

    recs = sample_from_run(tmp_path, steps=2, num_samples=2, prompt="a")
    assert len(recs) == 2 and recs[0]["checkpoint_step"] == 3
    assert recs[0]["tokens"][:2] == [tok.bos_id, *tok.encode("a")]
