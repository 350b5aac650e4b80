"""Checkpoint publication is crash-safe: a crash at any point of a save leaves the previous
checkpoint or the new one loadable through `latest`, never neither (issue 20)."""

import os
import shutil
import warnings

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


def _crash_before_call(monkeypatch, n: int) -> list:
    """Make the n-th call (0-based) to any of CRASH_POINTS raise `_Crash` instead of running.
    Returns the list of the calls, as (name, args): the crashed one is number n."""
    calls = []
    for module, name in CRASH_POINTS:
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args))
            if len(calls) == n + 1:
                raise _Crash
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls


def _latest_named(run) -> str:
    """The checkpoint `latest` names, which must be complete: loading needs no fallback (a
    fallback warns; here a warning is an error whatever the suite's filters)."""
    pointer = run / "checkpoints" / "latest"
    name = pointer.read_text().strip()
    assert (pointer.parent / name / "meta.json").is_file(), f"latest names {name}: incomplete"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_checkpoint(run) == pointer.parent / name
    return name


def test_crash_at_every_point_of_a_save_keeps_old_or_new_checkpoint(tmp_path, monkeypatch):
    """`latest` names the old checkpoint after a crash at or before the os.replace that
    publishes the new name, the new one after any later crash; both complete and loadable."""
    old, new = _model(0), _model(1)
    seen = []
    for n in range(100):
        run = tmp_path / f"run{n}"
        _save(run, 3, old)
        with monkeypatch.context() as m:
            calls = _crash_before_call(m, n)
            try:
                _save(run, 5, new)
                finished = True
            except _Crash:
                finished = False
        ran = calls if finished else calls[:n]  # calls[n] crashed (cleanup calls follow it)
        published = any(f == "replace" and str(args[1]).endswith("latest") for f, args in ran)
        name = _latest_named(run)
        assert name == ("step_0000005" if published else "step_0000003"), (n, calls[n - 1 :])
        ckpt = run / "checkpoints" / name
        step = read_meta(ckpt)["step"]
        probe = _model(2)
        state, _ = load_train_state(ckpt, probe)
        want = {3: old, 5: new}[step]
        assert state["step"] == step
        assert all(
            torch.equal(a, b)
            for a, b in zip(probe.state_dict().values(), want.state_dict().values(), strict=True)
        )
        seen.append(step)
        if finished:
            assert step == 5
            break
    else:
        pytest.fail("the save never finished")
    assert seen == sorted(seen) and seen.count(3) >= 4 and seen.count(5) >= 2, seen
    left = sorted(p.name for p in (tmp_path / f"run{n}" / "checkpoints").iterdir())
    assert left == ["latest", "step_0000005"]  # keep_last=1: one checkpoint, no temporaries
