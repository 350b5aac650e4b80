"""The train loop of `xdlm.train.loop.Trainer` on a real tiny run (`make_trainer` in
conftest.py): the metrics / validation / save cadence and the result, Ctrl-C at the edges, the
progress bar, the run directory's new-run / resume checks and refusals, the data checks at their
limits, and a sharded (FSDP2) run's save and resume."""

import json
import os
import re
import signal
import time
from dataclasses import replace

import pytest
import torch
from run_fixtures import TINY_TOKENS as TOKENS
from run_fixtures import nan_nats as _nan_nats
from run_fixtures import rewrite_meta, tiny_cfg

from xdlm.builders import lr_at
from xdlm.core.fused import fused_diffusion_loss
from xdlm.data.loader import TokenShards
from xdlm.runs import find_checkpoint
from xdlm.train.loop import train


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_loop_logs_validates_and_saves_on_its_cadence(make_trainer, capsys):
    tr = make_trainer(
        "train.steps=5",
        "train.log_every=2",
        "train.eval_every=3",
        "train.save_every=2",
        "train.keep_last=3",
        "train.warmup_steps=10",
    )
    capsys.readouterr()
    began = time.perf_counter()
    result = tr.run()
    took = time.perf_counter() - began
    out = capsys.readouterr().out.splitlines()
    assert out[0] == tr.precision.describe()
    assert out[1] == ("global batch 8 sequences = micro 8 x accum 1 x world 1 "
                      "(dist.strategy=none, device cpu)")  # fmt: skip
    records = _metrics(tr.run_dir)
    logged = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_rows" in r]
    assert [r["step"] for r in logged] == [2, 4, 5] and [r["step"] for r in valid] == [3, 5]
    for r in logged:
        assert r.keys() == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen",
                            "nan_steps", "elapsed"}  # fmt: skip
        assert r["lr"] == lr_at(tr.cfg.train, r["step"] - 1)
        assert r["tokens_seen"] == r["step"] * TOKENS and r["nan_steps"] == 0
        assert r["tokens_per_s"] > 0 and isinstance(r["grad_norm"], float)
    assert 0 < logged[0]["elapsed"] < logged[1]["elapsed"] < logged[2]["elapsed"] < took
    assert len({r["lr"] for r in logged}) == 3  # in warmup: each step's own rate
    v3 = valid[0]
    assert (f"step 3: valid NELBO {v3['valid_nats_per_token']:.4f} ± "
            f"{v3['valid_se_nats_per_token']:.4f} nats/token (first 8 rows), PPL ≤ "
            f"{v3['valid_ppl']:.2f}") in out  # fmt: skip
    ckpts = sorted(p.name for p in (tr.run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000002", "step_0000004", "step_0000005"]  # all 3 kept
    assert result.run_dir == tr.run_dir and (result.step, result.start_step) == (5, 0)
    assert (result.last_loss, result.last_loss_step) == (logged[-1]["loss"], 5)
    assert result.valid == {k: v for k, v in valid[-1].items() if k != "step"}
    assert not result.interrupted and result.nan_steps == 0 and result.tokens_per_s > 0
    assert tr.state.elapsed == logged[-1]["elapsed"]


def test_a_finished_run_resumed_trains_nothing_and_says_nothing(make_trainer, tiny_corpus, capsys):
    first = make_trainer("train.steps=2")
    first.run()
    first.close()
    capsys.readouterr()
    again = make_trainer("train.steps=2", resume=True)
    result = again.run()
    assert capsys.readouterr().out == ""
    assert (result.start_step, result.step, result.last_loss, result.valid) == (2, 2, None, None)
    assert result.tokens_per_s == 0


def test_the_last_loss_is_the_last_finite_one(make_trainer):
    tr = make_trainer("train.steps=3", "train.max_nan_steps=1", "train.eval_batches=0")
    real, step = tr.loss_fn, {"n": 0}

    def loss(*args, **kwargs):
        step["n"] += 1
        return (_nan_nats(real) if step["n"] == 3 else real)(*args, **kwargs)

    tr.loss_fn = loss
    result = tr.run()
    logged = {r["step"]: r for r in _metrics(tr.run_dir)}
    assert logged[3]["loss"] is None and logged[3]["nan_steps"] == 1
    assert (result.last_loss, result.last_loss_step) == (logged[2]["loss"], 2)
    assert result.nan_steps == 1 and result.step == 3


def _sigint_in_step(tr, n: int, times: int = 1) -> None:
    """Ctrl-C (`times` real SIGINTs) during the forward of step n."""
    real, calls = tr.loss_fn, []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    tr.loss_fn = loss


def _steps_saved(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("save_every", [10, 1])  # 1: step 1 was saved already, not twice
def test_ctrl_c_in_the_first_step_saves_that_step(make_trainer, capsys, save_every):
    tr = make_trainer("train.steps=3", f"train.save_every={save_every}", "train.eval_batches=0")
    _sigint_in_step(tr, 1)
    result = tr.run()
    assert result.interrupted and result.step == 1 and result.start_step == 0
    ckpt = tr.run_dir / "checkpoints" / "step_0000001"
    out = capsys.readouterr().out
    assert out.endswith(f"\ninterrupted at step 1; saved {ckpt}. Continue with --resume.\n")
    assert _steps_saved(tr.run_dir) == ["step_0000001"]


@pytest.mark.parametrize("step, kept", [(1, "the start (no checkpoint yet)"), (2, "step_0000001")])
def test_a_second_ctrl_c_stops_at_once_naming_what_resume_continues(
    make_trainer, capsys, step, kept
):
    tr = make_trainer("train.steps=3", "train.save_every=1", "train.eval_batches=0")
    _sigint_in_step(tr, step, times=2)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert capsys.readouterr().out.endswith(
        f"\nstopped without saving; --resume continues from {kept}\n"
    )
    assert len(_steps_saved(tr.run_dir)) == step - 1


def test_ctrl_c_in_the_last_step_ends_the_run_as_usual(make_trainer, capsys):
    tr = make_trainer("train.steps=2", "train.save_every=10", "train.eval_batches=0")
    _sigint_in_step(tr, 2)
    result = tr.run()
    assert not result.interrupted and result.step == 2
    captured = capsys.readouterr()
    assert "interrupted" not in captured.out and _steps_saved(tr.run_dir) == ["step_0000002"]
    assert f"loss={result.last_loss:.3f}" in captured.err and "train: 100%" in captured.err
    assert "| 2/2 [" in captured.err
    assert re.search(r"tok_s=[\d,]+\]", captured.err)


def test_the_bar_shows_nan_until_a_step_has_a_finite_loss(make_trainer, capsys):
    tr = make_trainer("train.steps=1", "train.max_nan_steps=1", "train.eval_batches=0")
    tr.loss_fn = _nan_nats(tr.loss_fn)
    assert tr.run().last_loss is None
    assert "loss=nan" in capsys.readouterr().err


def test_train_closes_the_run_so_a_resume_can_take_it(tiny_corpus, tiny_run, tmp_path):
    cfg = tiny_cfg(tiny_corpus, tiny_run / "data", "train.steps=1", "train.eval_batches=0")
    assert train(cfg, tmp_path / "run").step == 1
    assert train(replace(cfg, train=replace(cfg.train, steps=2)), tmp_path / "run", True).step == 2


def test_resume_removes_partial_saves_and_refuses_another_tokenizer(make_trainer, capsys, tmp_path):
    tr = make_trainer("train.steps=2", "train.eval_batches=0")
    tr.run()
    tr.close()
    stale = tmp_path / "run" / "checkpoints" / "step_0000009.tmp-abc"
    stale.mkdir()
    capsys.readouterr()
    again = make_trainer("train.steps=3", "train.eval_batches=0", "train.lr=0.002", resume=True)
    assert capsys.readouterr().out == f"removed {stale}, left by an interrupted save\n"
    assert not stale.exists() and again.state.step == 2
    event = [r for r in _metrics(tmp_path / "run") if r.get("event") == "resume"]
    assert event == [{"event": "resume", "step": 2, "changes": {
        "train.lr": [0.0003, 0.002], "train.steps": [2, 3]}}]  # fmt: skip
    again.close()
    rewrite_meta(find_checkpoint(tmp_path / "run"),
                 lambda m: m["data"].update(tokenizer_sha256="f" * 64))  # fmt: skip
    with pytest.raises(ValueError, match=r"was trained on data tokenized with tokenizer "
                       r"ffffffffffff, but \S+ was tokenized with [0-9a-f]{12} \(same "
                       r"vocabulary size or not, the ids mean other tokens\); resume on the "
                       r"run's own data$"):  # fmt: skip
        make_trainer("train.steps=3", resume=True)
    rewrite_meta(find_checkpoint(tmp_path / "run"), lambda m: m["data"].pop("tokenizer_sha256"))
    make_trainer("train.steps=3", resume=True).close()  # an older run: nothing to compare
    rewrite_meta(find_checkpoint(tmp_path / "run"), lambda m: m.pop("data"))
    assert make_trainer("train.steps=3", resume=True).state.step == 2


def test_new_run_or_resume_is_checked_against_the_directory(make_trainer, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=rf"^--resume: {re.escape(str(run))} holds no run "
                       r"\(no config.yaml, no checkpoint\); drop --resume to start a new run "
                       r"there$"):  # fmt: skip
        make_trainer(resume=True)
    first = make_trainer("train.steps=1", "train.eval_batches=0")
    first.run()
    first.close()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(run))} already holds a run; pass "
                       r"--resume to continue it or choose a new --out$"):  # fmt: skip
        make_trainer("train.steps=2")
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "tokenizer").iterdir()}
    (run / "config.yaml").unlink()  # a checkpoint is enough to resume
    again = make_trainer("train.steps=2", "train.eval_batches=0", resume=True)
    assert again.state.step == 1 and (run / "config.yaml").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (run / "tokenizer").iterdir()} == stamps


def test_a_resume_with_another_kernel_is_refused(make_trainer, tmp_path):
    first = make_trainer("train.steps=1", "train.eval_batches=0")
    first.run()
    first.close()
    with pytest.raises(ValueError, match=r"^checkpoint \S+step_0000001 was trained with kernel "
                       r"\{.*\} but the config and data give \{.*'k': 0.0.*\}; use the run's own "
                       r"config.yaml and data, or start a new --out$"):  # fmt: skip
        make_trainer("train.steps=2", "kernel.k=0", resume=True)


def test_a_new_run_copies_the_tokenizer_and_records_its_data(make_trainer, tiny_run):
    from xdlm.data.manifest import sha256_file

    tr = make_trainer()
    assert (tr.run_dir / "tokenizer").is_dir() and (tr.run_dir / "config.yaml").is_file()
    data = tr.meta["data"]
    assert data.keys() == {"path", "sources", "manifest_sha256", "seq_len", "mode", "vocab_size",
                           "mask_id", "tokenizer_sha256"}  # fmt: skip
    assert data["path"] == str(tiny_run / "data") and data["seq_len"] == 32
    assert data["sources"] == tr.manifest.sources and data["sources"]
    assert data["tokenizer_sha256"] == tr.manifest.tokenizer_sha256
    assert data["manifest_sha256"] == sha256_file(tiny_run / "data" / "manifest.json")
    assert (data["vocab_size"], data["mask_id"], data["mode"]) == (
        tr.manifest.vocab_size, tr.manifest.mask_id, tr.manifest.mode,
    )  # fmt: skip
    assert tr.meta["kernel"] == tr.kernel.spec()
    assert tr.meta["precision"] == {"name": "fp32", "reason": tr.precision.reason}


def test_the_train_split_must_hold_one_global_batch_exactly_at_the_limit(make_trainer, tiny_run):
    n = len(TokenShards(tiny_run / "data", "train"))
    assert make_trainer(f"data.batch_size={n}", run="at").loader is not None
    with pytest.raises(
        ValueError,
        match=rf"has {n} training rows, fewer than one global batch "
        rf"\({n + 1}×1\); lower data.batch_size or data.seq_len, or add data$",
    ):
        make_trainer(f"data.batch_size={n + 1}", run="past")


def test_a_seq_len_other_than_the_prepared_one_is_named(make_trainer):
    with pytest.raises(
        ValueError,
        match=r"^data.seq_len=33 but \S+ was prepared with "
        r"seq_len=32; set data.seq_len=32 or prepare the data again$",
    ):
        make_trainer("data.seq_len=33")


def test_the_fused_loss_needs_the_unwrapped_model(make_trainer):
    assert make_trainer("train.fused_loss=true", run="a").loss_fn is fused_diffusion_loss
    with pytest.raises(ValueError, match=r"^train.fused_loss needs dist.strategy=none and "
                       r"compile=false \(it calls model.hidden"):  # fmt: skip
        make_trainer("train.fused_loss=true", "train.compile=true", run="b")


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def test_a_sharded_run_saves_dcp_and_resumes_its_state(make_trainer, rank_0_of_2):
    from xdlm.runs import read_meta

    sets = ("dist.strategy=fsdp", "train.steps=2", "train.eval_batches=0", "train.lr=0.01")
    tr = make_trainer(*sets)
    assert tr.wrapped is tr.model and tr.model.blocks[0].__class__.__name__.startswith("FSDP")
    tr.run()
    ckpt = tr.run_dir / "checkpoints" / "step_0000002"
    assert (ckpt / "dcp").is_dir() and read_meta(ckpt)["sharded"] is True
    weights = {n: _full(p).clone() for n, p in tr.model.named_parameters()}
    shadow = {n: _full(s).clone() for n, s in tr.ema.shadow.items()}
    moments = [_full(st["exp_avg"]).clone() for st in tr.optimizer.state.values()]
    tr.close()
    again = make_trainer(*sets[:1], "train.steps=3", "train.eval_batches=0", resume=True)
    assert again.state.step == 2 and again.state.tokens_seen == 2 * TOKENS
    assert all(torch.equal(_full(p), weights[n]) for n, p in again.model.named_parameters())
    assert all(torch.equal(_full(s), shadow[n]) for n, s in again.ema.shadow.items())
    got = [_full(st["exp_avg"]) for st in again.optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(got, moments, strict=True)) and got
    assert again.ema.num_updates == 2


def test_a_sharded_model_refuses_the_fused_loss(make_trainer, rank_0_of_2):
    with pytest.raises(ValueError, match=r"^train.fused_loss needs dist.strategy=none"):
        make_trainer("dist.strategy=fsdp", "train.fused_loss=true")


def test_a_resume_names_the_state_file_whose_optimizer_does_not_fit(make_trainer, tmp_path):
    first = make_trainer("train.steps=1", "train.eval_batches=0")
    first.run()
    first.close()
    path = tmp_path / "run" / "checkpoints" / "step_0000001" / "state.pt"
    state = torch.load(path, weights_only=True)
    state["optimizer"]["param_groups"][1]["params"].pop()
    torch.save(state, path)
    n = sum(1 for _ in first.model.parameters())
    want = rf"^{re.escape(str(path))}: optimizer holds {n - 1} parameters, the model has {n}; "
    with pytest.raises(ValueError, match=want + "the file belongs to another run$"):
        make_trainer("train.steps=2", resume=True)


def test_a_resume_may_turn_the_ema_off_or_on(make_trainer, tmp_path):
    first = make_trainer("train.steps=1", "train.eval_batches=0")
    first.run()
    first.close()
    off = make_trainer("train.steps=2", "train.eval_batches=0", "train.ema_decay=0", resume=True)
    assert off.ema is None and off.state.step == 1
    off.run()
    off.close()
    on = make_trainer("train.steps=3", "train.ema_decay=0.9", resume=True)  # step 2 saved no EMA
    assert on.ema.num_updates == 0 and on.state.step == 2
