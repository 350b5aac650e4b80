"""Fault injection (issue 17, items 1-5): hostile checkpoints, concurrent trainers, failed saves
and corrupted data, each answered by safe behaviour or a clear error. The "silent or crashing"
inputs: test_bad_inputs.py; the code sandbox: test_sandbox.py."""

from __future__ import annotations

import shutil

import pytest
import torch
from run_fixtures import rewrite_meta, tiny_cfg

from xdlm.config import load_config
from xdlm.runs import find_checkpoint, load_run
from xdlm.train.checkpoint import load_train_state
from xdlm.train.loop import train
from xdlm.train.rundir import RunLockedError
from xdlm.train.safe_load import UnsafeCheckpointError

# ---------------------------------------------------------------- 1. code in checkpoints


class _Payload:
    """Unpickling this creates `marker` (stands in for os.system in a real attack)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_payload(ckpt, marker):
    torch.save({"progress": {"step": 4}, "evil": _Payload(marker)}, ckpt / "state.pt")


def test_malicious_state_pt_never_runs(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = find_checkpoint(run_copy)
    _plant_payload(ckpt, marker)
    loaded = load_run(run_copy)  # inference does not open state.pt at all
    assert loaded.step == 4 and not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*state.pt"):
        load_train_state(ckpt, loaded.model)
    assert not marker.exists()


def test_malicious_state_pt_refused_on_resume(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    _plant_payload(find_checkpoint(run_copy), marker)
    cfg = load_config(run_copy / "config.yaml", ["train.steps=6"])
    with pytest.raises(UnsafeCheckpointError, match="may be corrupt or crafted"):
        train(cfg, run_copy, resume=True)
    assert not marker.exists()


def test_inference_reads_no_state_pt_and_no_ema_with_no_ema(run_copy):
    ckpt = find_checkpoint(run_copy)
    (ckpt / "state.pt").unlink()
    raw = load_run(run_copy, use_ema=False).model.state_dict()
    ema = load_run(run_copy).model.state_dict()
    assert not all(torch.equal(raw[k], ema[k]) for k in raw)
    (ckpt / "ema.safetensors").write_bytes(b"garbage")  # --no-ema must not open it
    again = load_run(run_copy, use_ema=False).model.state_dict()
    assert all(torch.equal(raw[k], again[k]) for k in raw)
    with pytest.raises(ValueError, match="ema.safetensors.*truncated or corrupt"):
        load_run(run_copy)


def test_malicious_dcp_metadata_refused_by_consolidate(run_copy, tmp_path):
    import pickle

    from xdlm.commands.consolidate import consolidate

    marker = tmp_path / "pwned"
    ckpt = find_checkpoint(run_copy)
    rewrite_meta(ckpt, lambda meta: meta.update(sharded=True, world_size=1))
    (ckpt / "dcp").mkdir()
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*\.metadata"):
        consolidate(run_copy, tmp_path / "single")
    assert not marker.exists()


def test_load_dcp_round_trips_model_and_optimizer(tmp_path):
    """The restricted DCP reader loads what DCP writes (tensors and the optimizer's non-tensor
    entries) exactly."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from xdlm.train.safe_load import load_dcp

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

    def fresh():
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    model, opt = fresh()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path)
    model2, opt2 = fresh()
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    load_dcp(state, tmp_path)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert torch.equal(model.weight, model2.weight)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][0][k], b["state"][0][k]) for k in a["state"][0])


# ---------------------------------------------------------------- 2. one trainer per run dir

_HOLD = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("dirlock", sys.argv[2])  # stdlib only: fast
dirlock = sys.modules["dirlock"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dirlock)
run = Path(sys.argv[1])  # what acquire_run_lock takes
lock = dirlock.acquire_lock(run / "train.lock", guards=run, holder="trainer", harm="x")
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def lock_holder(tmp_path):
    """A second process holding `tmp_path / "run"`'s lock; killed at the end."""
    import subprocess
    import sys

    from xdlm import dirlock

    args = [sys.executable, "-c", _HOLD, str(tmp_path / "run"), dirlock.__file__]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as proc:  # closes the pipe
        try:
            assert proc.stdout.readline().strip() == "locked"
            yield proc
        finally:
            proc.kill()
            proc.wait(timeout=30)


def test_second_trainer_on_one_out_is_refused(tiny_corpus, tiny_run, tmp_path, lock_holder):
    import socket

    cfg = tiny_cfg(tiny_corpus, tiny_run / "data")
    pattern = f"in use by another trainer: pid {lock_holder.pid} on host '{socket.gethostname()}'"
    with pytest.raises(RunLockedError, match=pattern):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    lock_holder.kill()
    lock_holder.wait(timeout=30)  # its lock is now stale (dead pid): taken over
    assert train(cfg, tmp_path / "run").step == 4
    assert (tmp_path / "run" / "train.lock").read_text() == ""  # released at the end


def test_stale_lock_without_flock_uses_the_pid(tmp_path, monkeypatch, lock_holder, capsys):
    """Where flock is unsupported, the pid in the file decides: live -> refused, dead -> stale."""
    import errno
    import json
    import socket

    from xdlm import dirlock
    from xdlm.train import rundir

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(dirlock.fcntl, "flock", no_flock)
    with pytest.raises(RunLockedError, match=f"pid {lock_holder.pid}"):
        rundir.acquire_run_lock(tmp_path / "run")
    lock_holder.kill()
    lock_holder.wait(timeout=30)
    (tmp_path / "run" / "train.lock").write_text(
        json.dumps({"pid": lock_holder.pid, "host": socket.gethostname()})
    )  # a dead process's lock file
    lock = rundir.acquire_run_lock(tmp_path / "run")
    assert f"stale lock {tmp_path / 'run' / 'train.lock'} of pid {lock_holder.pid}" in (
        capsys.readouterr().out
    )
    lock.release()


# ---------------------------------------------------------------- 3. failed saves, `latest`


def test_full_disk_save_leaves_no_temp_dir_and_resume_works(
    tiny_corpus, tiny_run, tmp_path, monkeypatch
):
    import errno

    from xdlm.train import checkpoint

    real = checkpoint.torch.save

    def full_disk_at_step_4(obj, f, *args, **kwargs):
        if "step_0000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_at_step_4)
    cfg = tiny_cfg(tiny_corpus, tiny_run / "data")
    with pytest.raises(OSError, match="saving step 4 .* newest complete one is step_0000002"):
        train(cfg, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002"]
    monkeypatch.setattr(checkpoint.torch, "save", real)
    assert train(cfg, tmp_path / "run", resume=True).step == 4


def test_leftover_temp_dir_is_removed_on_resume(tiny_corpus, run_copy, tmp_path):
    partial = run_copy / "checkpoints" / "step_0000006.tmp-99999999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    cfg = load_config(run_copy / "config.yaml", ["train.steps=6"])
    assert train(cfg, run_copy, resume=True).step == 6
    assert not partial.exists()


def test_latest_naming_a_missing_dir_falls_back(run_copy):
    (run_copy / "checkpoints" / "latest").write_text("step_0000009\n")
    with pytest.warns(UserWarning, match="step_0000009, which is missing.*step_0000004"):
        assert find_checkpoint(run_copy).name == "step_0000004"
    (run_copy / "checkpoints" / "latest").unlink()
    shutil.rmtree(run_copy / "checkpoints" / "step_0000004")
    assert find_checkpoint(run_copy).name == "step_0000002"
    assert load_run(run_copy).step == 2


# ---------------------------------------------------------------- 4. data integrity


@pytest.fixture
def data_copy(tiny_run, tmp_path):
    shutil.copytree(tiny_run / "data", tmp_path / "data")
    return tmp_path / "data"


def _shards(data_dir):
    from xdlm.data.loader import TokenShards

    return TokenShards(data_dir, "train")


def test_id_beyond_vocab_refused_at_load(data_copy):
    import numpy as np

    from xdlm.data.manifest import load_manifest

    m = load_manifest(data_copy)
    tokens = np.memmap(data_copy / "train.bin", dtype=m.dtype, mode="r+")
    tokens[5 * m.seq_len + 3] = m.vocab_size + 7
    tokens.flush()
    with pytest.raises(ValueError, match=rf"train.bin: row 5 holds id {m.vocab_size + 7}"):
        _shards(data_copy)


def test_large_split_checks_ids_per_batch(data_copy, monkeypatch):
    """Above CHEAP_BYTES only sampled rows are scanned at load; every batch is checked."""
    import numpy as np

    from xdlm.data import integrity
    from xdlm.data.manifest import load_manifest

    m = load_manifest(data_copy)
    tokens = np.memmap(data_copy / "train.bin", dtype=m.dtype, mode="r+")
    tokens[1 * m.seq_len] = m.vocab_size  # row 1: not among the sampled rows
    tokens.flush()
    monkeypatch.setattr(integrity, "CHEAP_BYTES", 0)
    monkeypatch.setattr(integrity, "SAMPLE_ROWS", 2)
    shards = _shards(data_copy)  # no hash, sampled ids: loads
    shards.rows([0, 2])
    with pytest.raises(ValueError, match="row 1 holds id"):
        shards.rows([0, 1])


def test_edited_shard_with_valid_ids_fails_checksum(data_copy, tiny_corpus, capsys):
    import numpy as np

    from xdlm.cli import main
    from xdlm.data.manifest import load_manifest

    m = load_manifest(data_copy)
    assert main(["verify", str(data_copy)]) == 0
    out = data_copy.parent / "fresh"
    args = ["prepare", str(tiny_corpus), "--out", str(out), "--tokenizer", "char", "--verify"]
    assert main([*args, "--seq-len", "32"]) == 0
    tokens = np.memmap(data_copy / "train.bin", dtype=m.dtype, mode="r+")
    tokens[0] = 0 if tokens[0] != 0 else 1  # still a valid id
    tokens.flush()
    with pytest.raises(ValueError, match="train.bin fails its sha256 check"):
        _shards(data_copy)  # small file: hashed at every load
    assert main(["verify", str(data_copy)]) == 2
    assert f"{out}: verified" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate-bin", "truncate-lengths", "short-lengths"])
def test_truncated_files_named_at_load(tiny_corpus, tmp_path, damage):
    import numpy as np

    from xdlm.data.prepare import prepare

    out = tmp_path / "pad"
    prepare([tiny_corpus], out, tokenizer="char", seq_len=64, mode="pad", valid_fraction=0.0)
    if damage == "truncate-bin":
        path = out / "train.bin"
        path.write_bytes(path.read_bytes()[:-5])
        pattern = "train.bin has .* bytes, the manifest says"
    elif damage == "truncate-lengths":
        path = out / "train.lengths.npy"
        path.write_bytes(path.read_bytes()[:-16])
        pattern = "train.lengths.npy \\(row lengths\\) is truncated or corrupt"
    else:
        np.save(out / "train.lengths.npy", np.load(out / "train.lengths.npy")[:-1])
        pattern = "train.lengths.npy \\(row lengths\\) has shape"
    with pytest.raises(ValueError, match=pattern):
        _shards(out)


def test_tokenizer_fingerprint_recorded_and_mismatch_refused(
    tiny_corpus, tiny_run, tmp_path, capsys
):
    """Data from another tokenizer with the same vocabulary size: eval and resume refuse."""
    from xdlm.cli import main
    from xdlm.data.manifest import load_manifest
    from xdlm.data.prepare import prepare
    from xdlm.data.tokenizers import load_tokenizer_dir

    data = load_manifest(tiny_run / "data")
    run_tok = load_tokenizer_dir(tiny_run / "run" / "tokenizer")
    assert data.tokenizer_sha256 == run_tok.fingerprint()
    assert read_meta_data(tiny_run / "run")["tokenizer_sha256"] == data.tokenizer_sha256
    # One character swapped for one the corpus lacks: the same V, other ids.
    text = tiny_corpus.read_text()
    assert "z" in text and "\u00f1" not in text
    other = tmp_path / "other.txt"
    other.write_text(text.replace("z", "\u00f1"))
    prepare([other], tmp_path / "foreign", tokenizer="char", seq_len=32, valid_fraction=0.1)
    foreign = load_manifest(tmp_path / "foreign")
    assert foreign.vocab_size == data.vocab_size and foreign.mask_id == data.mask_id
    assert foreign.tokenizer_sha256 != data.tokenizer_sha256
    code = main(["eval", "--ckpt", str(tiny_run / "run"), "--data", str(tmp_path / "foreign")])
    assert code == 2
    assert "tokenized with a different tokenizer" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    cfg = load_config(run / "config.yaml", [f"data.path={tmp_path / 'foreign'}", "train.steps=6"])
    with pytest.raises(ValueError, match="trained on data tokenized with tokenizer"):
        train(cfg, run, resume=True)


def read_meta_data(run_dir):
    from xdlm.runs import read_meta

    return read_meta(find_checkpoint(run_dir))["data"]
