"""The train loop's parts on a real tiny run (`tiny_run`'s prepared data, 1-layer DiT): the
step (micro-batches, the global-batch loss, its gradient, skipped non-finite steps), labels of
a class-conditional model, validation, the loop's metrics / validation / save cadence and its
result, the run directory's checks, and the data checks at their limits."""

import json
import os
import re
import signal
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from run_fixtures import rewrite_meta, tiny_cfg

from xdlm.builders import lr_at
from xdlm.core.fused import fused_diffusion_loss
from xdlm.core.objective import diffusion_loss
from xdlm.data.loader import TokenShards
from xdlm.runs import find_checkpoint
from xdlm.train.loop import NonFiniteLossError, Trainer, train
from xdlm.train.run_state import LoopState

TOKENS = 8 * 32  # one micro-batch of tiny_cfg: 8 rows of 32 tokens, no padding


@pytest.fixture
def make(tiny_corpus, tiny_run, tmp_path):
    """make(*sets, run="run", resume=False): a Trainer on tiny_run's data, closed at the end."""
    made = []

    def trainer(*sets, run="run", resume=False):
        cfg = tiny_cfg(tiny_corpus, tiny_run / "data", *sets)
        made.append(Trainer(cfg, tmp_path / run, resume))
        return made[-1]

    yield trainer
    for t in made:
        t.close()


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the step


def test_a_step_is_the_global_mean_over_its_micro_batches(make):
    tr = make("train.grad_accum=2", "train.warmup_steps=4", "train.lr=0.01")
    seen, real = [], tr.loss_fn
    assert real is diffusion_loss

    def loss(model, kernel, schedule, x0, **kw):
        out = real(model, kernel, schedule, x0, **kw)
        seen.append((x0.shape, kw["t"], out.nats.detach(), kw["attention_mask"], kw["cond"]))
        return out

    tr.loss_fn = loss
    before = [p.detach().clone() for p in tr.model.parameters()]
    mean = tr.train_step()
    assert [s[0] for s in seen] == [(8, 32), (8, 32)]
    assert all(s[3] is None and s[4] is None for s in seen)  # packed rows, no classes
    assert mean == pytest.approx(float(sum(s[2] for s in seen)) / (2 * TOKENS), rel=1e-6)
    # one antithetic draw over the 16 rows of the global batch: (u + i/16) mod 1, i = 0..15
    t_min = tr.cfg.train.t_min
    frac = (torch.cat([s[1] for s in seen]) - t_min) / (1 - t_min)
    want = torch.remainder(frac[0] + torch.arange(16) / 16, 1.0)
    assert torch.allclose(frac, want, atol=1e-5)
    assert tr.state == LoopState(step=1, nan_steps=0, tokens_seen=2 * TOKENS, elapsed=0.0)
    assert tr.optimizer.param_groups[0]["lr"] == lr_at(tr.cfg.train, 0) == pytest.approx(0.0025)
    assert all(p.grad is None for p in tr.model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))
    assert tr.ema.num_updates == 1 and tr.last_grad_norm > 0
    tr.train_step()
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    assert tr.state.tokens_seen == 4 * TOKENS and tr.ema.num_updates == 2


def test_padded_rows_count_their_real_tokens_only(tiny_corpus, tmp_path):
    """data.mode=pad: the global token count (the loss's denominator, tokens_seen) is the number
    of real tokens in the step's micro-batches, not rows × seq_len."""
    cfg = tiny_cfg(tiny_corpus, tmp_path / "pad", "data.mode=pad", "train.grad_accum=2")
    tr = Trainer(cfg, tmp_path / "run")
    try:
        seen, real = [], tr.loss_fn

        def loss(*args, **kw):
            out = real(*args, **kw)
            seen.append((kw["attention_mask"], out.nats.detach()))
            return out

        tr.loss_fn = loss
        mean = tr.train_step()
        real_tokens = sum(int(mask.sum()) for mask, _ in seen)
        assert all(mask is not None for mask, _ in seen) and real_tokens < 2 * TOKENS
        assert tr.state.tokens_seen == real_tokens
        assert mean == pytest.approx(float(sum(n for _, n in seen)) / real_tokens, rel=1e-6)
    finally:
        tr.close()


def test_each_micro_batch_loss_is_divided_by_the_global_tokens(make):
    """The gradient is that of Σ nats / (real tokens of the global batch)."""
    tr = make("train.grad_accum=2", "train.grad_clip=inf", "train.ema_decay=0")
    p = next(tr.model.parameters())
    total = float(p.detach().sum())
    calls = []

    def loss(model, kernel, schedule, x0, **kw):  # micro-batch a has nats (a + 1)·Σp
        calls.append(x0)
        return SimpleNamespace(nats=p.sum() * len(calls))

    tr.loss_fn = loss
    mean = tr.train_step()
    assert len(calls) == 2 and tr.ema is None
    assert mean == pytest.approx(3 * total / (2 * TOKENS), rel=1e-5)
    assert tr.last_grad_norm == pytest.approx(3 / (2 * TOKENS) * p.numel() ** 0.5, rel=1e-5)


def _nan_nats(real):
    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        return replace(out, nats=out.nats * float("nan"))

    return loss


def test_a_non_finite_step_is_skipped_up_to_max_nan_steps(make):
    tr = make("train.max_nan_steps=1", "train.ema_decay=0.5")
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.loss_fn = _nan_nats(tr.loss_fn)
    assert tr.train_step() is None  # 1 = max_nan_steps: skipped
    assert tr.state == LoopState(step=1, nan_steps=1, tokens_seen=TOKENS, elapsed=0.0)
    assert all(torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))
    assert all(p.grad is None for p in tr.model.parameters())
    assert tr.ema.num_updates == 0 and not hasattr(tr, "last_grad_norm")
    with pytest.raises(NonFiniteLossError, match=rf"^{re.escape(str(tr.run_dir))}: 2 steps had a "
                       r"non-finite loss or gradient, "
                       r"more than train.max_nan_steps=1 \(last at step 2: loss=nan, "
                       r"gradient norm=nan\); stopped without saving it, the newest checkpoint "
                       r"\(none yet\) is kept"):  # fmt: skip
        tr.train_step()
    assert tr.state.step == 1 and tr.state.nan_steps == 2


def test_an_infinite_gradient_of_a_finite_loss_is_non_finite(make):
    tr = make()
    real = tr.loss_fn

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        p = next(tr.model.parameters())
        p.register_hook(lambda g: torch.full_like(g, float("inf")))
        return out

    tr.loss_fn = loss
    with pytest.raises(NonFiniteLossError, match=r"step 1 had non-finite values \(loss=\d"
                       r"[^,]*, gradient norm=inf\)"):  # fmt: skip
        tr.train_step()


# ---------------------------------------------------------------- labels


def test_labels_of_a_class_conditional_model(make):
    tr = make("model.num_classes=3")
    labels = torch.tensor([0, 1, 2, 2])
    state = tr.noise_gen.get_state()
    assert torch.equal(tr._cond(labels, 0.0), labels)
    assert torch.equal(tr.noise_gen.get_state(), state)  # no drop, no draw from the noise
    assert torch.equal(tr._cond(labels, 1.0), torch.full((4,), 3))  # all the null class
    state = tr.noise_gen.get_state()
    mixed = tr._cond(torch.zeros(64, dtype=torch.long), 0.5)
    assert set(mixed.tolist()) == {0, 3} and not torch.equal(tr.noise_gen.get_state(), state)
    tr.noise_gen.set_state(state)
    assert torch.equal(tr._cond(torch.zeros(64, dtype=torch.long), 0.5), mixed)  # its stream
    with pytest.raises(ValueError, match=r"^labels must be in \[0, model.num_classes=3\), got 3"):
        tr._cond(torch.tensor([0, 3]), 0.0)
    with pytest.raises(ValueError, match=r"^labels must be in \[0, model.num_classes=3\)"):
        tr._cond(torch.tensor([-1, 2]), 0.0)
    with pytest.raises(
        ValueError,
        match=r"^model.num_classes=3 but \S+ has no labels; prepare "
        r"labelled data \(xdlm images prepare\) or set model.num_classes=0$",
    ):
        tr._cond(None, 0.1)
    with pytest.raises(ValueError, match="has no labels"):
        tr.train_step()  # the text data has none


def test_a_step_passes_each_rows_label_to_the_denoiser(make):
    tr = make("model.num_classes=3", "train.cond_drop=0", "train.weighting=unit")
    real_next, labels = tr.loader.next_batch, []

    def next_batch():  # the text rows, labelled as an image-token dataset's would be
        batch = real_next()
        labels.append(torch.arange(8) % 3)
        return replace(batch, labels=labels[-1])

    tr.loader.next_batch = next_batch
    seen, real = [], tr.loss_fn
    tr.loss_fn = lambda *a, **kw: seen.append(kw) or real(*a, **kw)
    tr.train_step()
    assert torch.equal(seen[0]["cond"], labels[0]) and seen[0]["weighting"] is tr.weighting


def test_an_unconditional_model_ignores_labels(make):
    assert make()._cond(torch.tensor([5, 7]), 0.5) is None


@pytest.mark.parametrize("fused", [False, True])
def test_the_precision_probe_times_this_runs_loss(make, fused):
    """`precision=auto` times `_probe_loss`: the run's own loss (fused or not, its weighting),
    noise drawn from the probe's generator."""
    tr = make(f"train.fused_loss={str(fused).lower()}", "train.weighting=unit")
    x0 = torch.randint(0, tr.manifest.vocab_size - 1, (2, 32))
    loss = fused_diffusion_loss if fused else diffusion_loss
    forwards = []
    tr.model.register_forward_hook(lambda m, a, out: forwards.append(out.shape))
    got = tr._probe_loss(tr.model, x0, torch.Generator().manual_seed(3))
    assert forwards == ([] if fused else [(2, 32, tr.manifest.vocab_size)])  # fused: no logits
    want = loss(tr.model, tr.kernel, tr.schedule, x0, generator=torch.Generator().manual_seed(3),
                weighting=tr.weighting)  # fmt: skip
    assert torch.equal(got.nats, want.nats)
    elbo = loss(tr.model, tr.kernel, tr.schedule, x0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(got.nats, elbo.nats)  # unit weighting, not the default


# ---------------------------------------------------------------- validation


def test_validation_rows_are_capped_by_eval_batches_and_the_split(make):
    tr = make("train.eval_batches=1")
    live = [p.detach().clone() for p in tr.model.parameters()]
    tr.train_step()
    trained = [p.detach().clone() for p in tr.model.parameters()]
    got = tr.validate()
    assert got.keys() == {"valid_nats_per_token", "valid_se_nats_per_token", "valid_ppl",
                          "valid_tokens", "valid_rows"}  # fmt: skip
    assert (got["valid_rows"], got["valid_tokens"]) == (8, TOKENS)
    assert got["valid_ppl"] == pytest.approx(torch.tensor(got["valid_nats_per_token"]).exp())
    assert tr.model.training  # back to training, with its live (not EMA) weights
    assert all(torch.equal(a, p) for a, p in zip(trained, tr.model.parameters(), strict=True))
    assert not all(torch.equal(a, p) for a, p in zip(live, trained, strict=True))
    n = len(tr.valid)
    tr.cfg.train.eval_batches = 1000
    assert tr.validate()["valid_rows"] == n
    tr.cfg.train.eval_batches = 0
    assert tr.validate() is None


def test_validation_follows_the_eval_settings(make):
    """eval.seed, eval.t_samples, eval.quadrature and train.t_min reach the estimator."""
    from xdlm.eval.distributed import evaluate_rows_distributed
    from xdlm.eval.likelihood import shard_batches

    tr = make("train.eval_batches=1", "eval.seed=5", "eval.t_samples=3",
              "eval.quadrature=gauss-legendre", "train.t_min=0.05")  # fmt: skip
    got = tr.validate()["valid_nats_per_token"]
    with torch.no_grad(), tr.ema.swapped(tr.model):
        want = evaluate_rows_distributed(
            tr.model, tr.kernel, tr.schedule, shard_batches(tr.valid, 8, 8), tr.ctx, seed=5,
            t_samples=3, method="gauss-legendre", t_min=0.05,
        ).nats_per_token  # fmt: skip
    assert got == want


def test_validation_of_a_single_row(make):
    assert make("data.batch_size=1", "train.eval_batches=1").validate()["valid_rows"] == 1


def test_validation_uses_the_ema_weights(make):
    tr = make("train.eval_batches=1", "train.ema_decay=0.5", "train.lr=0.05")
    for _ in range(2):
        tr.train_step()
    with_ema = tr.validate()
    tr.ema = None
    live = tr.validate()
    assert with_ema["valid_nats_per_token"] != live["valid_nats_per_token"]
    tr.ema = SimpleNamespace(swapped=_Swap)
    assert tr.validate() == live  # a swap that loads nothing gives the live weights' number


class _Swap:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        assert not torch.is_grad_enabled()  # validation runs without autograd
        return self.model

    def __exit__(self, *exc):
        return False


def test_a_sharded_model_validates_whole_global_batches(make, monkeypatch):
    from xdlm.train import validation

    tr = make("train.eval_batches=1000", "data.batch_size=5")
    n = len(tr.valid)
    assert n % 5  # the split is not a whole number of batches
    assert tr.validate()["valid_rows"] == n
    monkeypatch.setattr(validation.D, "is_sharded", lambda model: model is tr.model)
    assert tr.validate()["valid_rows"] == n - n % 5


# ---------------------------------------------------------------- the loop


def test_the_loop_logs_validates_and_saves_on_its_cadence(make, capsys):
    tr = make("train.steps=5", "train.log_every=2", "train.eval_every=3", "train.save_every=2",
              "train.keep_last=3", "train.warmup_steps=10")  # fmt: skip
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


def test_a_finished_run_resumed_trains_nothing_and_says_nothing(make, tiny_corpus, capsys):
    first = make("train.steps=2")
    first.run()
    first.close()
    capsys.readouterr()
    again = make("train.steps=2", resume=True)
    result = again.run()
    assert capsys.readouterr().out == ""
    assert (result.start_step, result.step, result.last_loss, result.valid) == (2, 2, None, None)
    assert result.tokens_per_s == 0


def test_the_last_loss_is_the_last_finite_one(make):
    tr = make("train.steps=3", "train.max_nan_steps=1", "train.eval_batches=0")
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
def test_ctrl_c_in_the_first_step_saves_that_step(make, capsys, save_every):
    tr = make("train.steps=3", f"train.save_every={save_every}", "train.eval_batches=0")
    _sigint_in_step(tr, 1)
    result = tr.run()
    assert result.interrupted and result.step == 1 and result.start_step == 0
    ckpt = tr.run_dir / "checkpoints" / "step_0000001"
    out = capsys.readouterr().out
    assert out.endswith(f"\ninterrupted at step 1; saved {ckpt}. Continue with --resume.\n")
    assert _steps_saved(tr.run_dir) == ["step_0000001"]


@pytest.mark.parametrize("step, kept", [(1, "the start (no checkpoint yet)"), (2, "step_0000001")])
def test_a_second_ctrl_c_stops_at_once_naming_what_resume_continues(make, capsys, step, kept):
    tr = make("train.steps=3", "train.save_every=1", "train.eval_batches=0")
    _sigint_in_step(tr, step, times=2)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert capsys.readouterr().out.endswith(
        f"\nstopped without saving; --resume continues from {kept}\n"
    )
    assert len(_steps_saved(tr.run_dir)) == step - 1


def test_ctrl_c_in_the_last_step_ends_the_run_as_usual(make, capsys):
    tr = make("train.steps=2", "train.save_every=10", "train.eval_batches=0")
    _sigint_in_step(tr, 2)
    result = tr.run()
    assert not result.interrupted and result.step == 2
    captured = capsys.readouterr()
    assert "interrupted" not in captured.out and _steps_saved(tr.run_dir) == ["step_0000002"]
    assert f"loss={result.last_loss:.3f}" in captured.err and "train: 100%" in captured.err
    assert "| 2/2 [" in captured.err and "| 4/2 [" not in captured.err  # one step, one tick
    assert re.search(r"tok_s=[\d,]+\]", captured.err)


def test_the_bar_shows_nan_until_a_step_has_a_finite_loss(make, capsys):
    tr = make("train.steps=1", "train.max_nan_steps=1", "train.eval_batches=0")
    tr.loss_fn = _nan_nats(tr.loss_fn)
    assert tr.run().last_loss is None
    assert "loss=nan" in capsys.readouterr().err


def test_train_closes_the_run_so_a_resume_can_take_it(tiny_corpus, tiny_run, tmp_path):
    cfg = tiny_cfg(tiny_corpus, tiny_run / "data", "train.steps=1", "train.eval_batches=0")
    assert train(cfg, tmp_path / "run").step == 1
    assert train(replace(cfg, train=replace(cfg.train, steps=2)), tmp_path / "run", True).step == 2


# ---------------------------------------------------------------- the run directory


def test_resume_removes_partial_saves_and_refuses_another_tokenizer(make, capsys, tmp_path):
    tr = make("train.steps=2", "train.eval_batches=0")
    tr.run()
    tr.close()
    stale = tmp_path / "run" / "checkpoints" / "step_0000009.tmp-abc"
    stale.mkdir()
    capsys.readouterr()
    again = make("train.steps=3", "train.eval_batches=0", "train.lr=0.002", resume=True)
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
        make("train.steps=3", resume=True)
    rewrite_meta(find_checkpoint(tmp_path / "run"), lambda m: m["data"].pop("tokenizer_sha256"))
    make("train.steps=3", resume=True).close()  # an older run: nothing to compare
    rewrite_meta(find_checkpoint(tmp_path / "run"), lambda m: m.pop("data"))
    assert make("train.steps=3", resume=True).state.step == 2


def test_new_run_or_resume_is_checked_against_the_directory(make, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=rf"^--resume: {re.escape(str(run))} holds no run "
                       r"\(no config.yaml, no checkpoint\); drop --resume to start a new run "
                       r"there$"):  # fmt: skip
        make(resume=True)
    first = make("train.steps=1", "train.eval_batches=0")
    first.run()
    first.close()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(run))} already holds a run; pass "
                       r"--resume to continue it or choose a new --out$"):  # fmt: skip
        make("train.steps=2")
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "tokenizer").iterdir()}
    (run / "config.yaml").unlink()  # a checkpoint is enough to resume
    again = make("train.steps=2", "train.eval_batches=0", resume=True)
    assert again.state.step == 1 and (run / "config.yaml").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (run / "tokenizer").iterdir()} == stamps


def test_a_resume_with_another_kernel_is_refused(make, tmp_path):
    first = make("train.steps=1", "train.eval_batches=0")
    first.run()
    first.close()
    with pytest.raises(ValueError, match=r"^checkpoint \S+step_0000001 was trained with kernel "
                       r"\{.*\} but the config and data give \{.*'k': 0.0.*\}; use the run's own "
                       r"config.yaml and data, or start a new --out$"):  # fmt: skip
        make("train.steps=2", "kernel.k=0", resume=True)


def test_a_new_run_copies_the_tokenizer_and_records_its_data(make, tiny_run):
    from xdlm.data.manifest import sha256_file

    tr = make()
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


# ---------------------------------------------------------------- data checks and the loss


def test_the_train_split_must_hold_one_global_batch_exactly_at_the_limit(make, tiny_run):
    n = len(TokenShards(tiny_run / "data", "train"))
    assert make(f"data.batch_size={n}", run="at").loader is not None
    with pytest.raises(
        ValueError,
        match=rf"has {n} training rows, fewer than one global batch "
        rf"\({n + 1}×1\); lower data.batch_size or data.seq_len, or add data$",
    ):
        make(f"data.batch_size={n + 1}", run="past")


def test_a_seq_len_other_than_the_prepared_one_is_named(make):
    with pytest.raises(
        ValueError,
        match=r"^data.seq_len=33 but \S+ was prepared with "
        r"seq_len=32; set data.seq_len=32 or prepare the data again$",
    ):
        make("data.seq_len=33")


def test_the_fused_loss_needs_the_unwrapped_model(make):
    assert make("train.fused_loss=true", run="a").loss_fn is fused_diffusion_loss
    with pytest.raises(ValueError, match=r"^train.fused_loss needs dist.strategy=none and "
                       r"compile=false \(it calls model.hidden"):  # fmt: skip
        make("train.fused_loss=true", "train.compile=true", run="b")


# ---------------------------------------------------------------- a sharded (FSDP2) run


@pytest.fixture
def fsdp_of_one(tmp_path, monkeypatch):
    """FSDP2 in a real gloo group of one process, the trainer told the world has 2 ranks (so it
    shards: one process never does); each collective then spans this one rank. Gradient scale
    and data split follow the declared 2 ranks: only what is saved and loaded back is checked."""
    import torch.distributed as dist

    from xdlm.collectives import DistContext
    from xdlm.train import loop

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    ctx = DistContext(0, 2, 0, torch.device("cpu"))
    monkeypatch.setattr(loop.D, "setup_distributed", lambda cfg, device: ctx)
    yield
    dist.destroy_process_group()


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def test_a_sharded_run_saves_dcp_and_resumes_its_state(make, fsdp_of_one):
    from xdlm.runs import read_meta

    sets = ("dist.strategy=fsdp", "train.steps=2", "train.eval_batches=0", "train.lr=0.01")
    tr = make(*sets)
    assert tr.wrapped is tr.model and tr.model.blocks[0].__class__.__name__.startswith("FSDP")
    tr.run()
    ckpt = tr.run_dir / "checkpoints" / "step_0000002"
    assert (ckpt / "dcp").is_dir() and read_meta(ckpt)["sharded"] is True
    weights = {n: _full(p).clone() for n, p in tr.model.named_parameters()}
    shadow = {n: _full(s).clone() for n, s in tr.ema.shadow.items()}
    moments = [_full(st["exp_avg"]).clone() for st in tr.optimizer.state.values()]
    tr.close()
    again = make(*sets[:1], "train.steps=3", "train.eval_batches=0", resume=True)
    assert again.state.step == 2 and again.state.tokens_seen == 2 * TOKENS
    assert all(torch.equal(_full(p), weights[n]) for n, p in again.model.named_parameters())
    assert all(torch.equal(_full(s), shadow[n]) for n, s in again.ema.shadow.items())
    got = [_full(st["exp_avg"]) for st in again.optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(got, moments, strict=True)) and got
    assert again.ema.num_updates == 2


def test_a_sharded_model_refuses_the_fused_loss(make, fsdp_of_one):
    with pytest.raises(ValueError, match=r"^train.fused_loss needs dist.strategy=none"):
        make("dist.strategy=fsdp", "train.fused_loss=true")


def test_a_resume_names_the_state_file_whose_optimizer_does_not_fit(make, tmp_path):
    first = make("train.steps=1", "train.eval_batches=0")
    first.run()
    first.close()
    path = tmp_path / "run" / "checkpoints" / "step_0000001" / "state.pt"
    state = torch.load(path, weights_only=True)
    state["optimizer"]["param_groups"][1]["params"].pop()
    torch.save(state, path)
    n = sum(1 for _ in first.model.parameters())
    want = rf"^{re.escape(str(path))}: optimizer holds {n - 1} parameters, the model has {n}; "
    with pytest.raises(ValueError, match=want + "the file belongs to another run$"):
        make("train.steps=2", resume=True)


def test_a_resume_may_turn_the_ema_off_or_on(make, tmp_path):
    first = make("train.steps=1", "train.eval_batches=0")
    first.run()
    first.close()
    off = make("train.steps=2", "train.eval_batches=0", "train.ema_decay=0", resume=True)
    assert off.ema is None and off.state.step == 1
    off.run()
    off.close()
    on = make("train.steps=3", "train.ema_decay=0.9", resume=True)  # step 2 saved no EMA
    assert on.ema.num_updates == 0 and on.state.step == 2


@pytest.fixture
def rank_0_of_2(tmp_path, monkeypatch):
    """DDP in a real gloo group of one process, the trainer told it is rank 0 of 2: what that
    rank computes of a step (its strata of t, gradient sync on its last micro-batch). (Rank 1
    cannot be played in a group of one: it would receive its own, undecided, precision.)"""
    import torch.distributed as dist

    from xdlm.collectives import DistContext
    from xdlm.train import loop

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    ctx = DistContext(0, 2, 0, torch.device("cpu"))
    monkeypatch.setattr(loop.D, "setup_distributed", lambda cfg, device: ctx)
    yield
    dist.destroy_process_group()


def test_rank_0_of_2_takes_its_strata_and_syncs_on_its_last_micro_batch(make, rank_0_of_2):
    tr = make("dist.strategy=ddp", "train.grad_accum=2", "train.t_min=0.05")
    seen, real = [], tr.loss_fn

    def loss(*args, **kw):
        seen.append((kw["t"], tr.wrapped.require_backward_grad_sync))
        return real(*args, **kw)

    tr.loss_fn = loss
    tr.train_step()
    assert [sync for _, sync in seen] == [False, True]
    # global batch of 2 micro × 2 ranks × 8 rows: micro-batch a of rank 0 holds positions
    # 2a·8 .. 2a·8 + 7 of (u + i/32) mod 1
    frac = (torch.cat([t for t, _ in seen]) - 0.05) / 0.95
    i = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    assert torch.allclose(frac, torch.remainder(frac[0] + i / 32, 1.0), atol=1e-5)


def test_times_without_antithetic_come_from_the_time_generator(make):
    from xdlm.core.objective import sample_times

    tr = make("train.antithetic=false", "train.t_min=0.05")
    g = torch.Generator().manual_seed(0)
    g.set_state(tr.time_gen.get_state())
    torch.rand((), generator=g)  # the step's u, unused without antithetic
    want = sample_times(8, g, t_min=0.05, antithetic=False)
    seen, real = [], tr.loss_fn
    tr.loss_fn = lambda *a, **kw: seen.append(kw["t"]) or real(*a, **kw)
    tr.train_step()
    assert torch.equal(seen[0], want)
