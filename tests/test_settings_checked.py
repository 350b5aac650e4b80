"""Nonsense settings (issue 28.6): each is refused where it is read, with one line naming the
key or flag, the value and what is allowed (the CLI exits with 2), instead of NaN weights, a
silently ignored flag or an output written somewhere else."""

from __future__ import annotations

import re

import pytest
import torch

from xdlm.cli import main
from xdlm.config import load_config


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.weight_decay=nan", r"train.weight_decay must be in \[0.0, inf\), got nan"),
        ("train.weight_decay=-1", r"train.weight_decay must be in \[0.0, inf\), got -1.0"),
        ("kernel.power=nan", r"kernel.power must be in \(0.0, inf\), got nan"),
        ("kernel.power=0", r"kernel.power must be in \(0.0, inf\), got 0.0"),
        ("kernel.eps=1", r"kernel.eps must be in \(0.0, 1.0\), got 1.0"),
        ("train.lr=.inf", r"train.lr must be in \(0.0, inf\), got inf"),
        ("train.lr=nan", r"train.lr must be in \(0.0, inf\), got nan"),
        ("train.beta2=1", r"train.beta2 must be in \[0.0, 1.0\), got 1.0"),
        ("model.dropout=1", r"model.dropout must be in \[0.0, 1.0\), got 1.0"),
        ("sample.guidance=nan", "sample.guidance must be a finite number, got nan"),
        ("eval.top_p=[0.9, 2]", r"eval.top_p must be in \(0.0, 1.0\], got 2.0"),
        ("eval.temperature=[-1]", r"eval.temperature must be in \[0.0, inf\), got -1.0"),
    ],
)
def test_nonsense_floats_refused_at_config_load(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, [override])


def test_infinite_grad_clip_still_means_no_clipping():
    assert load_config(None, ["train.grad_clip=.inf"]).train.grad_clip == float("inf")


def test_cli_train_weight_decay_nan_is_one_line(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "r"), "--set", "train.weight_decay=nan"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.weight_decay must be in" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["2", "0", "-0.5"])
def test_eval_top_p_outside_0_1_refused(tiny_run, capsys, value):
    """Regression: --top-p 2 was silently "off" (p >= 1 means no filtering)."""
    argv = ["eval", "--ckpt", str(tiny_run / "run"), "--gen-ppl", "--top-p", "0.9", value]
    assert main(argv) == 2
    assert re.search(r"eval.top_p must be in \(0.0, 1.0\], got", capsys.readouterr().err)


@pytest.mark.parametrize("seq_len", ["-1", "0", "1"])
def test_import_seq_len_below_2_refused(tmp_path, capsys, seq_len):
    """Regression: --seq-len -1 was accepted (and broke later), 0 silently became 1024."""
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    argv = ["import", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "run"), "--k", "0"]
    assert main([*argv, "--seq-len", seq_len]) == 2
    assert f"--seq-len must be >= 2 (tokens per row, the run's data.seq_len), got {seq_len}" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_plot_out_must_be_an_image_file(tiny_run, tmp_path, capsys):
    """Regression: `--out DIR` said it wrote DIR and wrote DIR.png."""
    run = str(tiny_run / "run")
    (tmp_path / "figs").mkdir()
    assert main(["plot", run, "--out", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err
    assert "is a directory; pass a file ending in one of" in err and "figs/curves.png" in err
    assert main(["plot", run, "--out", str(tmp_path / "curves")]) == 2
    assert "is not an image file name" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
    assert main(["plot", run, "--out", str(tmp_path / "figs" / "c.png")]) == 0
    assert f"wrote {tmp_path / 'figs' / 'c.png'}" in capsys.readouterr().out
    assert (tmp_path / "figs" / "c.png").is_file()


def test_mistyped_local_run_is_missing_not_a_hub_id(tiny_run, tmp_path, monkeypatch, capsys):
    """`--ckpt runs/x` where runs/ exists locally and x does not: the run is missing (it was
    sent to the Hub as the repo id "runs/x")."""
    monkeypatch.chdir(tiny_run)
    assert main(["sample", "--ckpt", "data/typo"]) == 2
    err = capsys.readouterr().err
    assert "no run at data/typo: data/ exists but holds no 'typo'" in err
    assert "['tokenizer']" in err  # what data/ holds, to spot the typo
