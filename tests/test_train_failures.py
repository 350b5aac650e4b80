"""How a training run fails (issue 28.5-7): non-finite values, a full disk during a save, a
failed start, resuming before the first checkpoint or after the last step. Each ends with one
line saying what happened and what to do, and loses nothing that was saved."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from run_fixtures import fill_disk, tiny_cfg, tiny_sets

from xdlm.cli import main
from xdlm.runs import find_checkpoint, load_run
from xdlm.train import loop as loop_mod
from xdlm.train.loop import NonFiniteLossError, train


def _sets(corpus, data_dir, *extra) -> list[str]:
    return [x for s in tiny_sets(corpus, data_dir, *extra) for x in ("--set", s)]


def _nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """The loss of the given (1-based) steps is NaN; the others are real."""
    real, real_step = loop_mod.diffusion_loss, loop_mod.Trainer.train_step
    current = {}

    def train_step(trainer):
        current["step"] = trainer.state.step + 1
        return real_step(trainer)

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        if current.get("step") in steps:
            return type(out)(out.nats * float("nan"), out.tokens, out.per_token, out.t, out.z_t)
        return out

    monkeypatch.setattr(loop_mod.Trainer, "train_step", train_step)
    monkeypatch.setattr(loop_mod, "diffusion_loss", loss)


def _error_line(capsys) -> str:
    """The one line the CLI printed for the error (stderr also holds the progress bar)."""
    lines = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert len(lines) == 1 and lines[0].startswith("xdlm train: error: "), lines
    return lines[0]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- non-finite values


def test_first_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_corpus, tiny_run, tmp_path, monkeypatch, capsys
):
    _nan_loss_at(monkeypatch, {3})
    argv = ["train", "--out", str(tmp_path / "run"), "--no-samples"]
    assert main([*argv, *_sets(tiny_corpus, tiny_run / "data")]) == 2
    err = _error_line(capsys)
    assert "step 3 had non-finite values (loss=nan" in err
    assert "the newest checkpoint step_0000002 is kept" in err and "train.max_nan_steps" in err
    assert find_checkpoint(tmp_path / "run").name == "step_0000002"


def test_absurd_lr_stops_at_the_first_non_finite_step(tiny_corpus, tiny_run, tmp_path, capsys):
    """Unpatched: lr=1e10 (before: 3 of 4 steps NaN, exit 0 and a finite "last loss")."""
    argv = ["train", "--out", str(tmp_path / "run"), "--no-samples"]
    assert main([*argv, *_sets(tiny_corpus, tiny_run / "data", "train.lr=1e10")]) == 2
    err = _error_line(capsys)
    assert "had non-finite values (loss=" in err and "Lower train.lr and continue" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_finite_weights_are_never_saved(tiny_corpus, tiny_run, tmp_path, monkeypatch):
    """A finite loss whose update makes a weight NaN: the save of that step is refused."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    calls = []

    def poison(optimizer, args, kwargs):  # after the update of step 2 (saved at once)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    hook = register_optimizer_step_post_hook(poison)
    try:
        with pytest.raises(NonFiniteLossError, match="step 2 had non-finite values \\(weights"):
            train(tiny_cfg(tiny_corpus, tiny_run / "data"), tmp_path / "run")
    finally:
        hook.remove()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skipping_non_finite_steps_is_opt_in_and_the_last_loss_is_honest(
    tiny_corpus, tiny_run, tmp_path, monkeypatch, capsys
):
    _nan_loss_at(monkeypatch, {2, 4})
    argv = ["train", "--out", str(tmp_path / "run"), "--no-samples"]
    sets = _sets(tiny_corpus, tiny_run / "data", "train.max_nan_steps=2")
    assert main([*argv, *sets]) == 0
    loss_3 = next(r["loss"] for r in _metrics(tmp_path / "run") if r["step"] == 3)
    out = capsys.readouterr().out
    assert f"last loss {loss_3:.4f} (step 3); 2 steps had a non-finite loss and were skipped" in out


# ---------------------------------------------------------------- small losses of state


def test_resume_before_the_first_checkpoint_logs_each_step_once(
    tiny_corpus, tiny_run, tmp_path, monkeypatch
):
    """Killed (here: a failing save) before the first checkpoint, then --resume: it starts
    over from step 0 and metrics.jsonl holds each step once."""
    from xdlm.train import checkpoint

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(checkpoint.torch, "save", full)
        with pytest.raises(OSError, match="saving step 2 .* newest complete one is none"):
            train(tiny_cfg(tiny_corpus, tiny_run / "data"), tmp_path / "run")
    assert [r["step"] for r in _metrics(tmp_path / "run") if "loss" in r] == [1, 2]
    assert train(tiny_cfg(tiny_corpus, tiny_run / "data"), tmp_path / "run", resume=True).step == 4
    assert [r["step"] for r in _metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


def test_failed_start_leaves_no_config_and_a_new_start_writes_its_own(
    tiny_corpus, tiny_run, tmp_path, monkeypatch
):
    """A start that fails in setup (a tracker package missing) writes no config.yaml; a
    config.yaml left by an older failed start is replaced by the config that really runs."""
    from xdlm.train import trackers

    def missing(*args, **kwargs):
        raise ValueError("train.tensorboard needs the tensorboard package")

    with monkeypatch.context() as m:
        m.setattr(trackers.Trackers, "__init__", missing)
        with pytest.raises(ValueError, match="tensorboard"):
            train(tiny_cfg(tiny_corpus, tiny_run / "data"), tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()
    (tmp_path / "run" / "config.yaml").write_text("train:\n  steps: 999\n")  # an old failure's
    train(tiny_cfg(tiny_corpus, tiny_run / "data", "train.steps=2"), tmp_path / "run")
    assert "steps: 2\n" in (tmp_path / "run" / "config.yaml").read_text()


def test_resuming_a_finished_run_says_so(run_copy, capsys):
    assert main(["train", "--out", str(run_copy), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"{run_copy} is finished: it is at step 4 and train.steps is 4" in out
    assert f"xdlm train --out {run_copy} --resume --set train.steps=N (N > 4)" in out
    assert "tokens/s" not in out and "last loss" not in out
    assert find_checkpoint(run_copy).name == "step_0000004"


# ---------------------------------------------------------------- a full disk (real)


@pytest.mark.parametrize(
    "fails_in, exc_name",
    [("model.safetensors", "SafetensorError"), ("state.pt", "RuntimeError")],
)
def test_full_disk_during_a_save_prints_the_documented_line_and_resumes_exactly(
    tiny_corpus, tiny_run, small_fs, capsys, fails_in, exc_name
):
    """A real full file system: step 4's save runs out of space inside `fails_in` (the raw
    error is a SafetensorError or torch's "unexpected pos" RuntimeError). The user sees one
    line; the partial checkpoint is gone; freeing space and --resume ends with the weights of
    the uninterrupted run."""
    run = small_fs / "run"
    shutil.copytree(tiny_run / "run", run)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "checkpoints" / "latest").write_text("step_0000002\n")
    sizes = {p.name: p.stat().st_size for p in (run / "checkpoints" / "step_0000002").iterdir()}
    before = {
        "model.safetensors": 0,
        "state.pt": sizes["model.safetensors"] + sizes["ema.safetensors"],
    }
    fill_disk(small_fs, before[fails_in] + 64 * 1024 + 16 * 1024)  # + page slack, metrics
    argv = ["train", "--out", str(run), "--resume", "--no-samples"]
    assert main(argv) == 2
    err = _error_line(capsys)
    assert f"saving step 4 into {run / 'checkpoints'} failed: no space left on device" in err
    assert f"({exc_name}: " in err
    assert "the newest complete one is step_0000002. Free disk space" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    (small_fs / "filler").unlink()
    assert main(argv) == 0
    for use_ema in (False, True):
        a = load_run(run, use_ema=use_ema).model.state_dict()
        b = load_run(tiny_run / "run", use_ema=use_ema).model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the lines themselves
@pytest.mark.parametrize(
    ("max_nan", "kept", "precision", "count", "lower"),
    [
        (0, None, "fp32", "step 7 had non-finite values (loss)", "Lower train.lr"),
        (2, "step_0000006", "bf16",
         "3 steps had a non-finite loss or gradient, more than train.max_nan_steps=2 (last at "
         "step 7: loss)", "Lower train.lr or use train.precision=fp32"),
    ],
)  # fmt: skip
def test_the_non_finite_line_names_the_kept_checkpoint_and_the_fixes(
    tmp_path, max_nan, kept, precision, count, lower
):
    from xdlm.train.failures import non_finite_error

    err = non_finite_error(tmp_path, 7, "loss", 3, max_nan, kept, precision)
    assert type(err) is NonFiniteLossError
    assert str(err) == (
        f"{tmp_path}: {count}; stopped without saving it, the newest checkpoint "
        f"{kept or '(none yet)'} is kept. {lower} and continue with --resume, or set "
        "train.max_nan_steps=N to skip up to N such steps"
    )


def test_the_failed_save_line_keeps_the_errno(tmp_path):
    import errno

    from xdlm.diskfull import describe
    from xdlm.train.failures import save_failed

    cause = OSError(errno.ENOSPC, "No space left on device")
    err = save_failed(cause, 4, tmp_path, None)
    assert type(err) is OSError and err.errno == errno.ENOSPC
    assert err.strerror == (
        f"saving step 4 into {tmp_path} failed: {describe(cause)}; the partial checkpoint was "
        "removed, the newest complete one is none. Free disk space (or lower train.keep_last) "
        "and continue with --resume"
    )
    assert save_failed(PermissionError(errno.EACCES, "denied"), 4, tmp_path, "s").errno == (
        errno.EACCES
    )


def test_a_sharded_weight_is_checked_through_its_local_shard():
    """FSDP's DTensor parameters: `to_local()` is the shard this rank holds."""
    from xdlm.collectives import DistContext
    from xdlm.train.failures import weights_finite

    class Sharded(torch.nn.Parameter):
        def to_local(self):
            return torch.full((2,), float("nan"))

    model = torch.nn.Linear(2, 2)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert weights_finite(model, ctx)
    model.weight = Sharded(model.weight.detach())
    assert not weights_finite(model, ctx)
