"""Fault injection (issue 17, "silent or crashing"): every bad value or file that crashed with a
traceback or was silently accepted now gets a clear error naming it and the fix, or correct
behaviour."""

from __future__ import annotations

import shutil

import pytest
import torch
from run_fixtures import rewrite_meta, tiny_cfg

from xdlm.config import load_config
from xdlm.runs import find_checkpoint, load_run
from xdlm.train.loop import train


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.save_every=0", "train.save_every must be an integer >= 1 .*got 0"),
        ("train.log_every=0", "train.log_every must be an integer >= 1"),
        ("train.eval_every=-2", "train.eval_every must be an integer >= 1"),
        ("train.grad_accum=0", "train.grad_accum must be an integer >= 1"),
        ("train.steps=-1", "train.steps must be an integer >= 1 .*got -1"),
        ("train.warmup_steps=-5", "train.warmup_steps must be an integer >= 0"),
        ("train.keep_last=0", "train.keep_last must be an integer >= 1"),
        ("data.batch_size=0", "data.batch_size must be an integer >= 1"),
        ("kernel.k=1.5", r"kernel.k must be in \[0.0, 1.0\], got 1.5"),
        ("train.lr=0", r"train.lr must be in \(0.0, inf\)"),
        ("train.ema_decay=1.0", r"train.ema_decay must be in \[0.0, 1.0\)"),
    ],
)
def test_config_values_out_of_range_named(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, [override])


def test_trainer_validates_programmatic_configs(tiny_corpus, tiny_run, tmp_path):
    import dataclasses

    cfg = tiny_cfg(tiny_corpus, tiny_run / "data")
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, save_every=0))
    with pytest.raises(ValueError, match="train.save_every must be"):
        train(bad, tmp_path / "run")


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        (["--num-samples", "0"], r"sample.num_samples \(--num-samples\) must be >= 1, got 0"),
        (["--num-samples", "-5"], r"sample.num_samples must be an integer >= 0 .*got -5"),
        (["--seq-len", "-4"], r"sample.seq_len must be an integer >= 1 .*got -4"),
        (["--steps", "0"], r"sample.steps must be an integer >= 1 .*got 0"),
        (["--batch-size", "0"], r"sample.batch_size must be an integer >= 1 .*got 0"),
        (["--top-p", "0"], r"sample.top_p must be in \(0.0, 1.0\], got 0.0"),
        (["--temperature", "-1"], r"sample.temperature must be in \[0.0, inf\), got -1.0"),
    ],
)
def test_sample_flags_checked(tiny_run, capsys, flags, pattern):
    import re

    from xdlm.cli import main

    assert main(["sample", "--ckpt", str(tiny_run / "run"), *flags]) == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_sampling_is_batched_and_streamed(tiny_run, tmp_path, monkeypatch, capsys):
    """A large --num-samples runs in bounded batches; each batch reaches the JSONL file as it
    finishes, so a Ctrl-C keeps what was done."""
    import json

    from xdlm.cli import main
    from xdlm.commands import sample as sample_cmd

    out = tmp_path / "s.jsonl"
    records = sample_cmd.sample_from_run(
        tiny_run / "run", num_samples=70, steps=1, seq_len=4, out=out
    )
    assert sorted({r["batch_start"] for r in records}) == [0, sample_cmd.DEFAULT_BATCH]
    assert len(out.read_text().splitlines()) == 70
    real, calls = sample_cmd.generate, []

    def interrupted_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_cmd, "generate", interrupted_second_batch)
    argv = ["sample", "--ckpt", str(tiny_run / "run"), "--num-samples", "6", "--batch-size", "2"]
    assert main([*argv, "--steps", "1", "--out", str(out)]) == 130
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1]
    assert "interrupted: 2 of 6 samples finished" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        ({"k": 0.5}, "kernel k=0.5 but its config says kernel.k=0.1"),
        ({"mask_id": 3}, "kernel mask_id=3 but the data has mask id"),
        ({"vocab_size": 500, "mask_id": 499}, "model.safetensors does not fit the model"),
    ],
    ids=["k", "mask-id", "vocab-size"],
)
def test_edited_meta_json_refused(run_copy, edit, pattern):
    """Edits with the digest recomputed (tests/test_corrupt_files.py: without)."""
    rewrite_meta(find_checkpoint(run_copy), lambda meta: meta["kernel"].update(edit))
    with pytest.raises(ValueError, match=pattern):
        load_run(run_copy)


def test_nan_weights_refused(run_copy):
    from safetensors.torch import load_file, save_file

    path = find_checkpoint(run_copy) / "model.safetensors"
    weights = load_file(str(path))
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(path))
    with pytest.raises(ValueError, match="model.safetensors: tensor .* holds non-finite"):
        load_run(run_copy, use_ema=False)


def test_truncated_model_safetensors_named(run_copy):
    path = find_checkpoint(run_copy) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt"):
        load_run(run_copy)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("bin.txt", b"caf\xe9 \xff\xfe binary", r"bin.txt is not UTF-8 text"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad.jsonl:2 is not valid JSON"),
        ("list.jsonl", b'{"text": "ok"}\n["a", "b"]\n', r"list.jsonl:2 holds a JSON list"),
        ("num.jsonl", b'{"text": 42}\n', r"num.jsonl:1: field 'text' is a int, not a string"),
        ("fake.txt.gz", b"not gzip at all", r"fake.txt.gz is not a valid gzip file"),
    ],
)
def test_bad_text_inputs_named(tmp_path, name, content, pattern):
    from xdlm.data.documents import read_documents

    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=pattern):
        read_documents(tmp_path / name)


def test_directory_input_named(tmp_path):
    from xdlm.cli import main
    from xdlm.data.documents import read_documents

    (tmp_path / "corpus").mkdir()
    with pytest.raises(ValueError, match=r"corpus is a directory; pass the files in it"):
        read_documents(tmp_path / "corpus")
    assert main(["prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "d")]) == 2


def test_resume_trims_metrics_to_the_checkpoint(run_copy):
    import json

    ckpts = run_copy / "checkpoints"
    shutil.rmtree(ckpts / "step_0000004")  # as if killed after logging steps 3-4, before saving
    (ckpts / "latest").write_text("step_0000002\n")
    with open(run_copy / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')  # a torn last line
    cfg = load_config(run_copy / "config.yaml")
    assert train(cfg, run_copy, resume=True).step == 4
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
