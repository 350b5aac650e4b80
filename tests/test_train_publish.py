"""Checkpoint publication is crash-safe: a crash at any point of a save leaves the previous
checkpoint or the new one loadable through `latest`, never neither (issue 20)."""

import os
import shutil

import pytest
import torch
from torch import nn

from xdlm.runs import find_checkpoint, read_meta
from xdlm.train.checkpoint import load_train_state, save_checkpoint

CRASH_POINTS = ((os, "rename"), (os, "replace"), (os, "fsync"), (shutil, "rmtree"))


class _Crash(Exception):
    """Stands in for a kill: raised before a filesystem operation, nothing after it runs."""


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def _save(run, step, model):
    """The smallest meta.json and state.pt that `read_meta` / `load_train_state` accept."""
    meta = {
        "kernel": {"vocab_size": 3, "mask_id": 2, "k": 0.0},
        "schedule": {"name": "linear"},
        "config": {},
    }
    state = {"step": step, "optimizer": {}, "ranks": [], "progress": {}}
    save_checkpoint(
        run, step, model=model, ema_state=None, train_state=state, meta=meta, keep_last=1
    )


def _crash_before_call(monkeypatch, n: int) -> None:
    """Make the n-th call (0-based) to any of CRASH_POINTS raise `_Crash` instead of running."""
    count = [0]
    for module, name in CRASH_POINTS:
        real = getattr(module, name)

        def wrapper(*args, _real=real, **kwargs):
            if count[0] == n:
                raise _Crash
            count[0] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)


def test_crash_at_every_point_of_a_save_keeps_old_or_new_checkpoint(tmp_path, monkeypatch):
    old, new = _model(0), _model(1)
    seen = set()
    for n in range(100):
        run = tmp_path / f"run{n}"
        _save(run, 3, old)
        with monkeypatch.context() as m:
            _crash_before_call(m, n)
            try:
                _save(run, 5, new)
                finished = True
            except _Crash:
                finished = False
        ckpt = find_checkpoint(run)  # raises if `latest` points at nothing complete
        step = read_meta(ckpt)["step"]
        probe = _model(2)
        state, _ = load_train_state(ckpt, probe)
        want = {3: old, 5: new}[step]
        assert state["step"] == step
        assert all(
            torch.equal(a, b)
            for a, b in zip(probe.state_dict().values(), want.state_dict().values(), strict=True)
        )
        seen.add(step)
        if finished:
            assert step == 5
            break
    else:
        pytest.fail("the save never finished")
    assert seen == {3, 5} and n >= 4, (seen, n)  # crashes hit both sides of the publication
    left = sorted(p.name for p in (tmp_path / f"run{n}" / "checkpoints").iterdir())
    assert left == ["latest", "step_0000005"]  # keep_last=1: one checkpoint, no temporaries
