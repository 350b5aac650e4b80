"""Checkpoint writing and reading at its edges (issue 29): the layout a save leaves, `latest`,
pruning at `keep_last` 0 / 1 / 2, partial saves, EMA and optimizer state round trips and every
refusal with its exact one-line message. Tiny `nn.Linear` models: each test runs in well under
a second. The crash-consistency sweep is tests/test_train_publish.py."""

import errno
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from xdlm.runs import find_checkpoint, read_meta
from xdlm.train import checkpoint
from xdlm.train.checkpoint import (
    has_checkpoint,
    load_optimizer_state,
    load_train_state,
    newest_checkpoint_name,
    remove_partial_saves,
    save_checkpoint,
)

META = {
    "kernel": {"vocab_size": 3, "mask_id": 2, "k": 0.0},
    "schedule": {"name": "linear"},
    "config": {},
}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def _state(step: int) -> dict:
    return {"step": step, "optimizer": {}, "ranks": [], "progress": {"epoch": 1}}


def _save(run, step, model, keep_last=None, ema_state=None, state=None):
    kwargs = {} if keep_last is None else {"keep_last": keep_last}
    return save_checkpoint(
        run, step, model=model, ema_state=ema_state, train_state=state or _state(step),
        meta=META, **kwargs,
    )  # fmt: skip


def _ema_state(model: nn.Module, offset: float) -> dict:
    shadow = {n: p.detach() + offset for n, p in model.named_parameters()}
    return {"decay": 0.9, "warmup": True, "num_updates": 7, "shadow": shadow}


def _listing(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def _latest(run) -> str:
    """The name `latest` holds; it must be complete (find_checkpoint needs no fallback)."""
    text = (run / "checkpoints" / "latest").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_checkpoint(run).name == text.strip()
    return text


# ------------------------------------------------------------------------ layout and latest
def test_a_save_into_a_new_nested_dir_leaves_one_complete_checkpoint(tmp_path):
    run = tmp_path / "a" / "b" / "run"  # parents created
    model = _model(0)
    ckpt = _save(run, 5, model)
    assert ckpt == run / "checkpoints" / "step_0000005"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    assert _listing(run) == ["latest", "step_0000005"]
    assert _latest(run) == "step_0000005\n"
    meta = read_meta(ckpt)
    assert meta["step"] == 5 and meta["kernel"] == META["kernel"]
    probe = _model(1)
    state, ema = load_train_state(ckpt, probe)
    assert _same_weights(probe, model)
    assert state == _state(5) and ema is None


def test_every_file_is_fsynced_before_the_rename_and_latest_after(tmp_path, monkeypatch):
    """The durability order of a save: every file of the checkpoint is fsynced before its
    directory is renamed into place; `latest`'s temporary file is fsynced before os.replace
    publishes it; the checkpoints directory is fsynced after."""
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        return real_rename(src, dst)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    model = _model(0)
    ckpt = _save(tmp_path / "run", 2, model, ema_state=_ema_state(model, 1.0))
    root = ckpt.parent
    renamed = events.index(("rename", str(ckpt)))
    synced = {Path(p).name for kind, p in events[:renamed] if kind == "fsync"}
    assert synced == {"ema.safetensors", "meta.json", "model.safetensors", "state.pt"}
    replaced = events.index(("replace", str(root / "latest")))
    assert events[replaced - 1] == ("fsync", str(root / f"latest.tmp-{os.getpid()}"))
    assert ("fsync", str(root)) in events[replaced + 1 :]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    """Resuming at step 5 and saving step 5 again: the new weights win, one directory."""
    run = tmp_path / "run"
    _save(run, 5, _model(0))
    newer = _model(1)
    _save(run, 5, newer)
    assert _listing(run) == ["latest", "step_0000005"]
    probe = _model(2)
    load_train_state(run / "checkpoints" / "step_0000005", probe)
    assert _same_weights(probe, newer)


def test_a_stale_temporary_of_this_process_is_replaced(tmp_path):
    """A temporary left by an earlier save of this pid (same name) does not block the save."""
    run = tmp_path / "run"
    stale = run / "checkpoints" / f"step_0000003.tmp-{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    _save(run, 3, _model(0))
    assert _listing(run) == ["latest", "step_0000003"]
    assert sorted(p.name for p in (run / "checkpoints" / "step_0000003").iterdir()) == [
        "meta.json", "model.safetensors", "state.pt",
    ]  # fmt: skip


def test_a_failed_save_leaves_no_partial_directory_and_keeps_latest(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _save(run, 2, _model(0))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError, match="No space left on device") as err:
        _save(run, 4, _model(1))
    assert err.value.errno == errno.ENOSPC
    assert _listing(run) == ["latest", "step_0000002"]
    assert _latest(run) == "step_0000002\n"


# ------------------------------------------------------------------------ pruning
@pytest.mark.parametrize(("keep_last", "kept"), [(0, [6]), (1, [6]), (2, [4, 6]), (None, [4, 6])])
def test_prune_keeps_keep_last_newest_and_at_least_one(tmp_path, keep_last, kept):
    """keep_last=0 still keeps the checkpoint just written; the default keeps two."""
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _save(run, step, _model(step), keep_last=keep_last)
    assert _listing(run) == ["latest", *(f"step_{s:07d}" for s in kept)]
    assert _latest(run) == "step_0000006\n"


def test_a_save_removes_what_interrupted_saves_left(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    (ckpts / "step_0000009.tmp-99999999").mkdir(parents=True)
    (ckpts / "step_0000009.tmp-99999999" / "model.safetensors").write_bytes(b"partial")
    (ckpts / "latest.tmp-99999999").write_text("step_0000009\n")
    _save(run, 2, _model(0))
    assert _listing(run) == ["latest", "step_0000002"]


def test_remove_partial_saves_returns_what_it_removed(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_0000009.tmp-12").mkdir(parents=True)
    (ckpts / "latest.tmp-12").write_text("x")
    (ckpts / "step_0000002").mkdir()
    removed = remove_partial_saves(tmp_path)
    assert sorted(p.name for p in removed) == ["latest.tmp-12", "step_0000009.tmp-12"]
    assert [p.name for p in ckpts.iterdir()] == ["step_0000002"]
    assert remove_partial_saves(tmp_path) == []


def test_an_old_or_partial_save_that_cannot_be_deleted_does_not_fail_the_save(
    tmp_path, monkeypatch
):
    """Pruning is best effort: a file that cannot be removed (EBUSY on a network mount) leaves
    its directory for the next save, after the new checkpoint was published."""
    run = tmp_path / "run"
    _save(run, 2, _model(0), keep_last=1)
    partial = run / "checkpoints" / "step_0000009.tmp-12"
    partial.mkdir()
    (partial / "junk").write_text("x")
    real = os.unlink

    def busy(path, *args, **kwargs):
        if Path(path).name in ("model.safetensors", "junk"):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", busy)
    newer = _model(1)
    assert _save(run, 4, newer, keep_last=1) == run / "checkpoints" / "step_0000004"
    assert _latest(run) == "step_0000004\n"
    assert _listing(run) == [
        "latest", "step_0000002.tmp-pruned", "step_0000004", "step_0000009.tmp-12",
    ]  # fmt: skip
    monkeypatch.setattr(os, "unlink", real)
    _save(run, 6, newer, keep_last=1)  # the next save removes what was left
    assert _listing(run) == ["latest", "step_0000006"]


# ------------------------------------------------------------------------ what --resume sees
def test_has_checkpoint_and_newest_name(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert not has_checkpoint(run) and newest_checkpoint_name(run) is None
    _save(run, 2, _model(0))
    _save(run, 4, _model(1))
    assert has_checkpoint(run) and newest_checkpoint_name(run) == "step_0000004"
    (run / "checkpoints" / "latest").unlink()  # complete checkpoints without a pointer
    assert has_checkpoint(run) and newest_checkpoint_name(run) == "step_0000004"


def test_latest_alone_counts_as_a_checkpoint(tmp_path):
    """A `latest` whose checkpoints are gone still makes the directory a run (a start without
    --resume is refused rather than overwriting it); resuming it names what is missing."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "latest").write_text("step_0000004\n")
    assert has_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        newest_checkpoint_name(tmp_path)


# ------------------------------------------------------------------------ EMA and train state
def test_ema_round_trips_shadow_and_meta_without_duplicating_tensors(tmp_path):
    model = _model(0)
    ema_state = _ema_state(model, 0.5)
    ckpt = _save(tmp_path / "run", 3, model, ema_state=ema_state)
    saved = torch.load(ckpt / "state.pt", weights_only=True)
    assert saved["ema_meta"] == {"decay": 0.9, "warmup": True, "num_updates": 7}
    state, ema = load_train_state(ckpt, _model(1))
    assert state == _state(3)  # ema_meta moved into the EMA state
    assert sorted(ema) == ["decay", "num_updates", "shadow", "warmup"]
    assert (ema["decay"], ema["warmup"], ema["num_updates"]) == (0.9, True, 7)
    assert ema["shadow"].keys() == ema_state["shadow"].keys()
    assert all(torch.equal(ema["shadow"][n], t) for n, t in ema_state["shadow"].items())


def test_an_ema_file_without_ema_meta_loads_its_shadow(tmp_path):
    """state.pt without `ema_meta` (written by hand or before it existed): the EMA is the
    shadow alone, no KeyError."""
    model = _model(0)
    ckpt = _save(tmp_path / "run", 3, model, ema_state=_ema_state(model, 0.5))
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["ema_meta"]
    torch.save(state, ckpt / "state.pt")
    _, ema = load_train_state(ckpt, _model(1))
    assert sorted(ema) == ["shadow"]


def test_an_ema_of_another_shape_is_refused_naming_its_file(tmp_path):
    model = _model(0)
    ckpt = _save(tmp_path / "run", 3, model)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}, str(ckpt / "ema.safetensors"))
    with pytest.raises(ValueError) as err:
        load_train_state(ckpt, _model(1))
    assert str(err.value) == (
        f"{ckpt / 'ema.safetensors'}: tensor weight has shape (3, 5), the model's is (3, 4); "
        "the file was edited or belongs to another run"
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("optimizer", None, "the key 'optimizer' is missing"),
        ("ranks", None, "the key 'ranks' is missing"),
        ("progress", None, "the key 'progress' is missing"),
        ("optimizer", [], "optimizer must be dict, got []"),
        ("ranks", {}, "ranks must be list, got {}"),
        ("progress", [], "progress must be dict, got []"),
    ],
)
def test_a_train_state_without_its_keys_is_refused_naming_state_pt(tmp_path, key, value, message):
    state = _state(3)
    if value is None:
        del state[key]
    else:
        state[key] = value
    ckpt = _save(tmp_path / "run", 3, _model(0), state=state)
    with pytest.raises(ValueError) as err:
        load_train_state(ckpt, _model(1))
    assert str(err.value).startswith(f"{ckpt / 'state.pt'}: {message}")


# ------------------------------------------------------------------------ state.pt refused
class _Foreign:
    """An object only a code-running unpickler could rebuild (here: a class of this module)."""


def _state_refusal(ckpt, error=ValueError) -> str:
    with pytest.raises(error) as err:
        load_train_state(ckpt, _model(1))
    assert type(err.value) is error
    return str(err.value)


def test_a_missing_empty_or_truncated_state_pt_is_named(tmp_path):
    ckpt = _save(tmp_path / "run", 3, _model(0))
    path, data = ckpt / "state.pt", (ckpt / "state.pt").read_bytes()
    fix = "; use another checkpoint of the run (checkpoints/step_N)"
    path.write_bytes(data[: len(data) // 2])
    text = _state_refusal(ckpt)
    assert text.startswith(f"{path} is truncated or corrupt (PytorchStreamReader failed reading")
    assert text.endswith(fix) and "\n" not in text
    assert len(text[len(f"{path} is truncated or corrupt (") : -len(f"){fix}")]) == 200
    path.write_bytes(b"")
    assert _state_refusal(ckpt) == f"{path} is truncated or corrupt (empty){fix}"
    path.unlink()
    text = _state_refusal(ckpt, FileNotFoundError)
    assert text == f"{path} is missing; the checkpoint is incomplete"


def test_a_state_pt_with_foreign_objects_is_refused_whatever_the_environment(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD changes torch.load's default, never xdlm's explicit
    weights_only=True; a list where a dict belongs is refused too."""
    from xdlm.train.safe_load import UnsafeCheckpointError

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ckpt = _save(tmp_path / "run", 3, _model(0), state={**_state(3), "x": _Foreign()})
    text = _state_refusal(ckpt, UnsafeCheckpointError)
    assert text.startswith(
        f"refusing to load {ckpt / 'state.pt'}: it holds objects other than tensors and plain "
        "containers (UnpicklingError: "
    )
    assert text.endswith(
        "). xdlm never writes such a file; it may be corrupt or crafted to run code. Do not "
        "load it; use a checkpoint you or xdlm wrote"
    )
    reason = text.split(" (UnpicklingError: ", 1)[1].split("). xdlm never", 1)[0]
    assert reason.startswith("Weights only load failed.") and "\n" not in reason
    torch.save([1, 2], ckpt / "state.pt")
    assert (
        _state_refusal(ckpt, UnsafeCheckpointError)
        == f"{ckpt / 'state.pt'} holds a list, not a dict"
    )


def test_a_state_pt_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    ckpt = _save(tmp_path / "run", 3, _model(0), state={**_state(3), "t": torch.ones(2)})
    with monkeypatch.context() as m:  # storages tagged "cuda:0", as a GPU run writes them
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({**_state(3), "t": torch.ones(2)}, ckpt / "state.pt")
    state, _ = load_train_state(ckpt, _model(1))
    assert state["t"].device.type == "cpu" and torch.equal(state["t"], torch.ones(2))


# ------------------------------------------------------------------------ optimizer state
def _adam(model: nn.Module, steps: int) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.ones(2, model.in_features)).sum().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("steps", [0, 1])
def test_an_optimizer_state_round_trips(tmp_path, steps):
    """After a step (moments and a 0-dim `step` tensor) and before any (no per-param state)."""
    saved = _adam(_model(0), steps).state_dict()
    opt = _adam(_model(1), 0)
    load_optimizer_state(tmp_path / "state.pt", opt, saved)
    loaded = opt.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    assert loaded["state"].keys() == saved["state"].keys() and len(loaded["state"]) == 2 * steps
    for i, per in saved["state"].items():
        assert all(torch.equal(loaded["state"][i][k], v) for k, v in per.items())


@pytest.mark.parametrize("state", [{}, [], {"param_groups": [{}], "state": {}}])
def test_something_else_than_an_optimizer_state_is_refused(tmp_path, state):
    with pytest.raises(ValueError) as err:
        load_optimizer_state(tmp_path / "state.pt", _adam(_model(0), 0), state)
    assert str(err.value) == (
        f"{tmp_path / 'state.pt'}: optimizer is not an optimizer state; restore the file or "
        "use another checkpoint"
    )


def test_an_optimizer_of_another_parameter_count_is_refused(tmp_path):
    saved = torch.optim.Adam([nn.Parameter(torch.zeros(3))]).state_dict()
    with pytest.raises(ValueError) as err:
        load_optimizer_state(tmp_path / "state.pt", _adam(_model(0), 0), saved)
    assert str(err.value) == (
        f"{tmp_path / 'state.pt'}: optimizer holds 1 parameters, the model has 2; the file "
        "belongs to another run"
    )


def test_a_moment_of_another_shape_is_refused_naming_it(tmp_path):
    saved = _adam(_model(0), 1).state_dict()
    saved["state"][1]["exp_avg_sq"] = torch.zeros(4)  # the bias has 3 entries
    with pytest.raises(ValueError) as err:
        load_optimizer_state(tmp_path / "state.pt", _adam(_model(1), 0), saved)
    assert str(err.value) == (
        f"{tmp_path / 'state.pt'}: optimizer state exp_avg_sq of parameter 1 has shape (4,), "
        "the parameter's is (3,); the file was edited or belongs to another run"
    )


def test_a_state_torch_refuses_is_one_line_naming_the_file(tmp_path):
    """Two groups where the optimizer has one (same parameter count): torch's ValueError."""
    saved = _adam(_model(0), 0).state_dict()
    group = saved["param_groups"][0]
    saved["param_groups"] = [{**group, "params": [0]}, {**group, "params": [1]}]
    with pytest.raises(ValueError) as err:
        load_optimizer_state(tmp_path / "state.pt", _adam(_model(1), 0), saved)
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'state.pt'}: optimizer state does not fit (")
    assert "parameter groups" in text and "\n" not in text
