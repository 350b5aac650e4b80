"""Ctrl-C at every phase of a step, then `--resume`: the final weights equal the uninterrupted
run's bit for bit (`xdlm.train.interrupts`). A real SIGINT is sent to this process from inside
the phase (data loading, forward, backward, optimizer step, validation, a save) on the real
training path; the reference is `tiny_run` (conftest.py: 4 steps, saves at 2 and 4)."""

import os
import shutil
import signal

import pytest
import torch
from run_fixtures import tiny_cfg
from torch.optim.optimizer import register_optimizer_step_pre_hook

from xdlm.cli import main as cli_main
from xdlm.data.loader import TokenShards
from xdlm.runs import find_checkpoint, load_run
from xdlm.train import checkpoint
from xdlm.train import loop as loop_mod
from xdlm.train.loop import train


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


class _Injector:
    """Sends SIGINT `times` times the first time `fire()` runs while step `at` is in flight."""

    def __init__(self, monkeypatch, at: int, times: int = 1):
        self.at, self.times, self.armed, self.fired = at, times, False, 0
        real_step, real_save = loop_mod.Trainer.train_step, loop_mod.Trainer.save

        def train_step(trainer):
            self.armed = trainer.state.step == self.at - 1
            try:
                return real_step(trainer)
            finally:
                self.armed = trainer.state.step == self.at  # its validation and save

        def save(trainer):
            try:
                return real_save(trainer)
            finally:
                self.armed = False

        monkeypatch.setattr(loop_mod.Trainer, "train_step", train_step)
        monkeypatch.setattr(loop_mod.Trainer, "save", save)

    def fire(self, *args, **kwargs) -> None:
        if self.armed and not self.fired:
            self.fired = self.times
            for _ in range(self.times):
                _sigint()


def _patch_phase(monkeypatch, phase: str, inject: _Injector):
    """Call `inject.fire()` from inside `phase` (only during training: `inject` is armed by
    the step in flight and its validation/save); returns the global hook to remove, if any."""
    if phase == "data":
        real_rows = TokenShards.rows

        def rows(shards, idx):
            if shards.split == "train":
                inject.fire()
            return real_rows(shards, idx)

        monkeypatch.setattr(TokenShards, "rows", rows)
    elif phase in ("forward", "backward"):

        def hook(module, args, output):
            if phase == "forward":
                inject.fire()
            elif torch.is_tensor(output) and output.requires_grad and inject.armed:
                output.register_hook(lambda grad: inject.fire())

        return torch.nn.modules.module.register_module_forward_hook(hook)
    elif phase == "optimizer":
        return register_optimizer_step_pre_hook(lambda *a: inject.fire())
    elif phase == "validation":
        real_validate = loop_mod.Trainer.validate

        def validate(trainer):
            inject.fire()
            return real_validate(trainer)

        monkeypatch.setattr(loop_mod.Trainer, "validate", validate)
    elif phase == "save":
        real_save = checkpoint.torch.save

        def save(obj, f, *args, **kwargs):
            inject.fire()
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(checkpoint.torch, "save", save)
    return None


def _weights(run_dir, use_ema):
    return load_run(run_dir, use_ema=use_ema).model.state_dict()


def _assert_same_weights(a, b) -> None:
    for use_ema in (False, True):
        wa, wb = _weights(a, use_ema), _weights(b, use_ema)
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differ, f"weights differ (use_ema={use_ema}): {differ[:3]}"


@pytest.mark.parametrize(
    "phase, at",
    [("data", 3), ("forward", 3), ("backward", 3), ("optimizer", 3), ("validation", 2),
     ("save", 2)],
)  # fmt: skip
def test_sigint_in_any_phase_resumes_bit_identically(
    phase, at, tiny_corpus, tiny_run, tmp_path, monkeypatch
):
    """The step in flight finishes, its boundary is saved, and the resumed run ends with the
    reference's raw and EMA weights. Before: the checkpoint was taken mid-step (loader one
    batch ahead, RNG advanced) and the weights differed."""
    inject = _Injector(monkeypatch, at)
    hook = _patch_phase(monkeypatch, phase, inject)
    try:
        result = train(tiny_cfg(tiny_corpus, tiny_run / "data"), tmp_path / "run")
    finally:
        if hook is not None:
            hook.remove()
    assert inject.fired and result.interrupted and result.step == at
    assert find_checkpoint(tmp_path / "run").name == f"step_{at:07d}"
    monkeypatch.undo()
    resumed = train(tiny_cfg(tiny_corpus, tiny_run / "data"), tmp_path / "run", resume=True)
    assert resumed.step == 4 and not resumed.interrupted
    _assert_same_weights(tmp_path / "run", tiny_run / "run")


def test_second_sigint_inside_a_save_keeps_the_previous_checkpoint(
    tiny_corpus, tiny_run, tmp_path, monkeypatch
):
    """Ctrl-C twice while step 4 is being saved: the save stops at once, its temporary
    directory is removed, step 2 stays `latest`, and a resume still ends bit-identically."""
    inject = _Injector(monkeypatch, at=4, times=2)
    _patch_phase(monkeypatch, "save", inject)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tiny_corpus, tiny_run / "data"), tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002"]
    monkeypatch.undo()
    assert train(tiny_cfg(tiny_corpus, tiny_run / "data"), tmp_path / "run", resume=True).step == 4
    _assert_same_weights(tmp_path / "run", tiny_run / "run")


def test_cli_ctrl_c_exits_130_with_the_resume_hint(tiny_run, tmp_path, monkeypatch, capfd):
    """`xdlm train`: Ctrl-C during step 3 says what it does, saves step 3, exits with 130."""
    shutil.copytree(tiny_run / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_0000004")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000002\n")
    inject = _Injector(monkeypatch, at=3)
    _patch_phase(monkeypatch, "data", inject)
    argv = ["train", "--out", str(tmp_path / "run"), "--resume", "--no-samples"]
    assert cli_main(argv) == 130
    captured = capfd.readouterr()
    assert "interrupt: finishing the current step, then saving" in captured.err
    assert "interrupted at step 3; saved" in captured.out and "--resume" in captured.out
    assert find_checkpoint(tmp_path / "run").name == "step_0000003"


def test_stop_request_finishes_the_step_then_a_second_ctrl_c_stops_at_once(capfd):
    """In-process: the first SIGINT sets `requested` and says so on fd 2, the second raises;
    leaving the block restores the previous handler."""
    from xdlm.train.interrupts import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert capfd.readouterr().err == (
        "\ninterrupt: finishing the current step, then saving a checkpoint (Ctrl-C again "
        "stops at once; the previous checkpoint stays)\n"
    )


def test_stop_request_outside_the_main_thread_leaves_ctrl_c_alone():
    import threading

    from xdlm.train.interrupts import StopRequest

    before, seen = signal.getsignal(signal.SIGINT), []

    def body():
        with StopRequest() as stop:
            seen.append(signal.getsignal(signal.SIGINT))
        seen.append(stop.requested)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before, False] and signal.getsignal(signal.SIGINT) is before
