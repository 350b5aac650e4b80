"""The sharded (DCP) checkpoint writer and reader in one process (a world-size-1 gloo group):
layout, meta.json's `sharded` / `world_size`, pruning, a failed save, and loading model,
optimizer and EMA back exactly, with and without an optimizer (as `xdlm consolidate` does).
The multi-process FSDP runs are tests/test_distributed.py (slow)."""

import errno

import pytest
import torch
import torch.distributed as dist
from torch import nn

from xdlm.models.ema import EMA
from xdlm.runs import read_meta
from xdlm.train import checkpoint
from xdlm.train.checkpoint import load_sharded_state, save_sharded_checkpoint

META = {
    "kernel": {"vocab_size": 3, "mask_id": 2, "k": 0.0},
    "schedule": {"name": "linear"},
    "config": {},
}


@pytest.fixture
def one_process(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def _trained(seed: int, steps: int) -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    for _ in range(steps):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        ema.update(model)
    return model, opt, ema


def _save(run, step, model, opt, ema, keep_last=None):
    kwargs = {} if keep_last is None else {"keep_last": keep_last}
    return save_sharded_checkpoint(
        run, step, model=model, optimizer=opt, ema_state=ema.state_dict() if ema else None,
        train_state={"step": step, "ranks": []}, meta=META, **kwargs,
    )  # fmt: skip


def _listing(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_a_sharded_save_loads_back_model_optimizer_and_ema(tmp_path, one_process):
    model, opt, ema = _trained(0, 2)
    run = tmp_path / "a" / "run"
    ckpt = _save(run, 4, model, opt, ema)
    assert ckpt == run / "checkpoints" / "step_0000004"
    assert _listing(run) == ["latest", "step_0000004"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["dcp", "meta.json", "state.pt"]
    meta = read_meta(ckpt)
    assert (meta["step"], meta["sharded"], meta["world_size"]) == (4, True, 1)

    model2, opt2, ema2 = _trained(1, 0)
    ema2.decay, ema2.warmup = 0.5, False
    state = load_sharded_state(ckpt, model2, opt2, ema2)
    assert state == {
        "step": 4, "ranks": [], "ema_meta": {"decay": 0.9, "warmup": True, "num_updates": 2},
    }  # fmt: skip
    assert torch.equal(model2.weight, model.weight) and torch.equal(model2.bias, model.bias)
    want, got = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert got.keys() == want.keys() == {0, 1}
    assert all(torch.equal(got[i][k], want[i][k]) for i in want for k in want[i])
    assert (ema2.decay, ema2.warmup, ema2.num_updates) == (0.9, True, 2)
    assert all(torch.equal(ema2.shadow[n], ema.shadow[n]) for n in ema.shadow)


def test_a_sharded_checkpoint_loads_without_optimizer_or_ema(tmp_path, one_process):
    """`xdlm consolidate` loads model (and EMA) only; a run without EMA saves none."""
    model, opt, ema = _trained(0, 1)
    ckpt = _save(tmp_path / "run", 2, model, opt, None)
    model2, _, _ = _trained(1, 0)
    state = load_sharded_state(ckpt, model2, None, None)
    assert state == {"step": 2, "ranks": []}
    assert torch.equal(model2.weight, model.weight)

    ckpt = _save(tmp_path / "run", 3, model, opt, ema)
    model3, _, ema3 = _trained(2, 0)
    load_sharded_state(ckpt, model3, None, ema3)
    assert torch.equal(model3.bias, model.bias) and ema3.num_updates == 1
    assert all(torch.equal(ema3.shadow[n], ema.shadow[n]) for n in ema.shadow)


def test_sharded_saves_prune_and_replace_stale_temporaries(tmp_path, one_process):
    model, opt, ema = _trained(0, 1)
    run = tmp_path / "run"
    stale = run / "checkpoints" / "step_0000002.tmp-sharded"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    _save(run, 2, model, opt, ema, keep_last=1)
    _save(run, 4, model, opt, ema, keep_last=1)
    assert _listing(run) == ["latest", "step_0000004"]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004\n"


def test_a_failed_sharded_save_leaves_no_partial_directory(tmp_path, one_process, monkeypatch):
    model, opt, ema = _trained(0, 1)
    run = tmp_path / "run"
    _save(run, 2, model, opt, ema)

    real = torch.save

    def full(obj, f, *args, **kwargs):  # DCP saves with torch.save too: fail state.pt only
        if str(f).endswith("state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError, match="No space left on device"):
        _save(run, 4, model, opt, ema)
    assert _listing(run) == ["latest", "step_0000002"]


def test_sharded_saves_keep_two_by_default(tmp_path, one_process):
    model, opt, _ = _trained(0, 1)
    for step in (2, 4, 6):
        _save(tmp_path / "run", step, model, opt, None)
    assert _listing(tmp_path / "run") == ["latest", "step_0000004", "step_0000006"]


def test_a_sharded_state_without_ema_meta_is_refused_naming_it(tmp_path, one_process):
    """state.pt edited (or written by hand) without the EMA's decay / warmup / count."""
    model, opt, ema = _trained(0, 1)
    ckpt = _save(tmp_path / "run", 2, model, opt, ema)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["ema_meta"]
    torch.save(state, ckpt / "state.pt")
    model2, opt2, ema2 = _trained(1, 0)
    with pytest.raises(ValueError) as err:
        load_sharded_state(ckpt, model2, opt2, ema2)
    assert str(err.value) == (
        f"{ckpt / 'state.pt'}: the key 'ema_meta' is missing; the file was edited or is "
        "foreign, restore it"
    )


class _Foreign:
    """An object only a code-running unpickler could rebuild (here: a class of this module)."""


def _refused(ckpt, model, opt, ema):
    from xdlm.train.safe_load import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError) as err:
        load_sharded_state(ckpt, model, opt, ema)
    assert type(err.value) is UnsafeCheckpointError
    return str(err.value)


def test_dcp_metadata_naming_other_globals_is_refused(tmp_path, one_process):
    """.metadata is unpickled with an allowlist: os.system, and a torch dtype's name under
    another module, are refused; a pickle of something else is not DCP metadata."""
    import os
    import pickle

    model, opt, ema = _trained(0, 1)
    ckpt = _save(tmp_path / "run", 2, model, opt, ema)
    meta = ckpt / "dcp" / ".metadata"
    for payload, name in (
        (pickle.dumps(os.system), "posix.system"),
        (b"cnumpy\nfloat32\n.", "numpy.float32"),
    ):
        meta.write_bytes(payload)
        assert _refused(ckpt, *_trained(1, 0)) == (
            f"refusing to load {meta}: it holds objects other than tensors and plain containers "
            f"(UnpicklingError: global {name} is not allowed). xdlm never writes such a file; "
            "it may be corrupt or crafted to run code. Do not load it; use a checkpoint you or "
            "xdlm wrote"
        )
    meta.write_bytes(b"c" + b"a" * 250 + b"\nb\n.")  # a long reason: its first 200 characters
    text = _refused(ckpt, *_trained(1, 0))
    reason = text.split("(UnpicklingError: ", 1)[1].split("). xdlm never", 1)[0]
    assert reason == ("global " + "a" * 250 + ".b is not allowed")[:200]
    meta.write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    assert _refused(ckpt, *_trained(1, 0)) == f"{meta} is not DCP metadata; it is not a checkpoint"


def test_dcp_metadata_of_an_older_torch_without_storage_meta_loads(tmp_path, one_process):
    import pickle

    model, opt, ema = _trained(0, 1)
    ckpt = _save(tmp_path / "run", 2, model, opt, ema)
    meta = ckpt / "dcp" / ".metadata"
    metadata = pickle.loads(meta.read_bytes())  # our own file, written just now
    metadata.storage_meta = None
    meta.write_bytes(pickle.dumps(metadata))
    model2, opt2, ema2 = _trained(1, 0)
    load_sharded_state(ckpt, model2, opt2, ema2)
    assert torch.equal(model2.weight, model.weight)


def test_a_dcp_entry_holding_a_foreign_object_is_refused(tmp_path, one_process, monkeypatch):
    """Non-tensor entries are unpickled with weights_only=True, whatever the environment."""
    import torch.distributed.checkpoint as dcp

    from xdlm.train.safe_load import UnsafeCheckpointError, load_dcp

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    dcp.save({"plain": "kept", "x": _Foreign()}, checkpoint_id=tmp_path / "d")
    state = {"plain": None}
    load_dcp(state, tmp_path / "d")
    assert state == {"plain": "kept"}
    with pytest.raises(UnsafeCheckpointError) as err:
        load_dcp({"x": None}, tmp_path / "d")
    text = str(err.value)
    assert text.startswith(
        f"refusing to load {tmp_path / 'd' / 'x'}: it holds objects other than tensors and "
        "plain containers (UnpicklingError: Weights only load failed."
    )
    assert len(text.split(" (UnpicklingError: ")[1].split("). xdlm never")[0]) <= 200
