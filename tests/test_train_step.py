"""The optimizer step and in-loop validation of `xdlm.train.loop.Trainer` on a real tiny run
(`tiny_run`'s prepared data, 1-layer DiT; `make_trainer` in conftest.py): micro-batches, the
global-batch loss and its gradient, padded rows, skipped non-finite steps, labels of a
class-conditional model, the precision probe's loss, the strata of t of a rank, validation's
rows, estimator settings and EMA weights."""

import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from run_fixtures import TINY_TOKENS as TOKENS
from run_fixtures import nan_nats as _nan_nats
from run_fixtures import tiny_cfg

from xdlm.builders import lr_at
from xdlm.core.fused import fused_diffusion_loss
from xdlm.core.objective import diffusion_loss
from xdlm.train.loop import NonFiniteLossError, Trainer
from xdlm.train.run_state import LoopState


def test_a_step_is_the_global_mean_over_its_micro_batches(make_trainer):
    tr = make_trainer("train.grad_accum=2", "train.warmup_steps=4", "train.lr=0.01")
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


def test_each_micro_batch_loss_is_divided_by_the_global_tokens(make_trainer):
    """The gradient is that of Σ nats / (real tokens of the global batch)."""
    tr = make_trainer("train.grad_accum=2", "train.grad_clip=inf", "train.ema_decay=0")
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


def test_a_non_finite_step_is_skipped_up_to_max_nan_steps(make_trainer):
    tr = make_trainer("train.max_nan_steps=1", "train.ema_decay=0.5")
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


def test_an_infinite_gradient_of_a_finite_loss_is_non_finite(make_trainer):
    tr = make_trainer()
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


def test_labels_of_a_class_conditional_model(make_trainer):
    tr = make_trainer("model.num_classes=3")
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


def test_a_step_passes_each_rows_label_to_the_denoiser(make_trainer):
    tr = make_trainer("model.num_classes=3", "train.cond_drop=0", "train.weighting=unit")
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


def test_an_unconditional_model_ignores_labels(make_trainer):
    assert make_trainer()._cond(torch.tensor([5, 7]), 0.5) is None


@pytest.mark.parametrize("fused", [False, True])
def test_the_precision_probe_times_this_runs_loss(make_trainer, fused):
    """`precision=auto` times `_probe_loss`: the run's own loss (fused or not, its weighting),
    noise drawn from the probe's generator."""
    tr = make_trainer(f"train.fused_loss={str(fused).lower()}", "train.weighting=unit")
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


def test_validation_rows_are_capped_by_eval_batches_and_the_split(make_trainer):
    tr = make_trainer("train.eval_batches=1")
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


def test_validation_follows_the_eval_settings(make_trainer):
    """eval.seed, eval.t_samples, eval.quadrature and train.t_min reach the estimator."""
    from xdlm.eval.distributed import evaluate_rows_distributed
    from xdlm.eval.likelihood import shard_batches

    tr = make_trainer("train.eval_batches=1", "eval.seed=5", "eval.t_samples=3",
              "eval.quadrature=gauss-legendre", "train.t_min=0.05")  # fmt: skip
    got = tr.validate()["valid_nats_per_token"]
    with torch.no_grad(), tr.ema.swapped(tr.model):
        want = evaluate_rows_distributed(
            tr.model, tr.kernel, tr.schedule, shard_batches(tr.valid, 8, 8), tr.ctx, seed=5,
            t_samples=3, method="gauss-legendre", t_min=0.05,
        ).nats_per_token  # fmt: skip
    assert got == want


def test_validation_of_a_single_row(make_trainer):
    assert make_trainer("data.batch_size=1", "train.eval_batches=1").validate()["valid_rows"] == 1


def test_validation_uses_the_ema_weights(make_trainer):
    tr = make_trainer("train.eval_batches=1", "train.ema_decay=0.5", "train.lr=0.05")
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


def test_a_sharded_model_validates_whole_global_batches(make_trainer, monkeypatch):
    from xdlm.train import validation

    tr = make_trainer("train.eval_batches=1000", "data.batch_size=5")
    n = len(tr.valid)
    assert n % 5  # the split is not a whole number of batches
    assert tr.validate()["valid_rows"] == n
    monkeypatch.setattr(validation.D, "is_sharded", lambda model: model is tr.model)
    assert tr.validate()["valid_rows"] == n - n % 5


def test_rank_0_of_2_takes_its_strata_and_syncs_on_its_last_micro_batch(make_trainer, rank_0_of_2):
    tr = make_trainer("dist.strategy=ddp", "train.grad_accum=2", "train.t_min=0.05")
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


def test_times_without_antithetic_come_from_the_time_generator(make_trainer):
    from xdlm.core.objective import sample_times

    tr = make_trainer("train.antithetic=false", "train.t_min=0.05")
    g = torch.Generator().manual_seed(0)
    g.set_state(tr.time_gen.get_state())
    torch.rand((), generator=g)  # the step's u, unused without antithetic
    want = sample_times(8, g, t_min=0.05, antithetic=False)
    seen, real = [], tr.loss_fn
    tr.loss_fn = lambda *a, **kw: seen.append(kw["t"]) or real(*a, **kw)
    tr.train_step()
    assert torch.equal(seen[0], want)
