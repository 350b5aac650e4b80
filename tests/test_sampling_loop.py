"""`generate`: oracle denoisers, exact marginals, fixed tokens, caching, guidance, semi-AR."""

from __future__ import annotations

import math
import time

import pytest
import torch
from scipy.stats import chi2

from xdlm.builders import build_sampler
from xdlm.config import SampleConfig, load_config
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import LogLinear
from xdlm.models.dit import DiT, DiTConfig
from xdlm.sampling import (
    XDM,
    Ancestral,
    AncestralFinal,
    Confidence,
    Dilated,
    GreedyFinal,
    PredictorCorrector,
    ReMDM,
    Threshold,
    UniformAlpha,
    UniformT,
    edit_budget,
    fixed_from_template,
    generate,
)

V, M, L = 7, 6, 6
SCHED = LogLinear()


def _kernel(k: float) -> MixedKernel:
    return MixedKernel(V - 1, None, 1.0) if k == 1.0 else MixedKernel(V, M, k)


class Perfect:
    """p_θ = one-hot x0 (finite logits), counting calls."""

    def __init__(self, x0: torch.Tensor, vocab: int = V):
        self.x0, self.vocab, self.calls = x0, vocab, 0

    def __call__(self, z, t, attention_mask=None, cond=None):
        self.calls += 1
        return torch.nn.functional.one_hot(self.x0, self.vocab).float().mul(60.0)


class Noisy:
    """Fresh random logits each call (its own generator): tries to change every position."""

    def __init__(self, v: int = V, seed: int = 1):
        self.g, self.v = torch.Generator().manual_seed(seed), v

    def __call__(self, z, t, attention_mask=None, cond=None):
        return 3.0 * torch.randn(*z.shape, self.v, generator=self.g)


class ProductOracle:
    """p_θ = π_l (L, V) at every step, whatever z_t. For data x ~ Π_l π_l this makes each
    reverse step exact: Σ_z f_{α_t}(π, z)·Q_{t|s}(z | e)·f_{α_s}(π, e)/f_{α_t}(π, z) = f_{α_s}(π, e)
    because p_θ(z_s | z_t) plugs p_θ in for x (xdlm-math.md, "Reverse step")."""

    def __init__(self, pi: torch.Tensor):
        self.logits = torch.log(pi.clamp_min(1e-30))  # (L, V), π(m) = 0

    def __call__(self, z, t, attention_mask=None, cond=None):
        return self.logits.expand(z.shape[0], -1, -1)


CASES = [  # (sampler, k, extra generate kwargs)
    (Ancestral(), 0.0, {}),
    (Ancestral(), 0.1, {}),
    (Ancestral(), 1.0, {}),
    (Ancestral(), 0.1, {"final": GreedyFinal(), "grid": UniformAlpha()}),
    (ReMDM(eta=0.5), 0.0, {}),
    (ReMDM(eta=0.5, rescale=True), 0.0, {}),
    (Confidence(), 0.0, {}),
    (Confidence(), 0.1, {}),
]


@pytest.mark.parametrize("sampler,k,kw", CASES)
def test_perfect_denoiser_reproduces_data(sampler, k, kw):
    kern = _kernel(k)
    x0 = torch.randint(
        kern.vocab_size - (k < 1), (3, L), generator=torch.Generator().manual_seed(5)
    )
    out = generate(
        Perfect(x0, kern.vocab_size),
        kern,
        SCHED,
        batch_size=3,
        seq_len=L,
        steps=4,
        generator=torch.Generator().manual_seed(0),
        sampler=sampler,
        **kw,
    )
    assert torch.equal(out.tokens, x0)


STOCHASTIC = [  # every random draw of each sampler, final step included, from `generator`
    (Ancestral(), 0.1),
    (ReMDM(eta=0.5), 0.0),
    (PredictorCorrector(eta=0.5), 0.1),
    (Threshold(threshold=0.5, revise_margin=0.2, remask_below=0.3), 0.1),
    (Dilated(uniform_reveal=True), 0.1),
    (XDM(temperature=1.0, remasking="random"), 0.1),
]


@pytest.mark.parametrize("sampler,k", STOCHASTIC)
def test_one_seed_gives_one_sample_and_another_seed_another(sampler, k):
    """The global RNG is never drawn from: two runs with one seed agree although the global
    state moved in between (a draw without the generator would differ), and a second seed
    changes the sample. The grid stops at t = 0.5, so the final step has masks to reveal."""

    def run(seed):
        torch.rand(5)  # moves the global RNG between runs
        return generate(Noisy(), _kernel(k), SCHED, batch_size=4, seq_len=12, steps=4,
                        generator=torch.Generator().manual_seed(seed), sampler=sampler,
                        final=AncestralFinal(), grid=UniformT(0.5)).tokens  # fmt: skip

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("sampler,k,kw", CASES)
def test_fixed_tokens_never_change(sampler, k, kw, block_size):
    """Infilling template (prefix + inner fixed tokens), with and without semi-AR blocks."""
    kern = _kernel(k)
    fixed = fixed_from_template([1, None, 2, 3, None, None, 4, None, None, None], 4, 10)
    out = generate(
        Noisy(kern.vocab_size),
        kern,
        SCHED,
        batch_size=4,
        seq_len=10,
        steps=5,
        generator=torch.Generator().manual_seed(0),
        sampler=sampler,
        fixed=fixed,
        record=True,
        block_size=block_size,
        context_len=6 if block_size else None,
        **kw,
    )
    states = out.trajectory.states  # (S + 1, B, L)
    assert bool((states[:, fixed.mask] == fixed.tokens[fixed.mask]).all())
    assert bool((out.trajectory.transitions() != 0).any())  # the free positions did move


@pytest.mark.parametrize(
    "k,sampler", [(0.0, Ancestral()), (0.5, Ancestral()), (1.0, Ancestral()), (0.0, ReMDM(eta=0.3))]
)
def test_product_distribution_marginals_chi_square(k, sampler):
    kern = _kernel(k)
    n_data = kern.vocab_size - (k < 1)
    g = torch.Generator().manual_seed(11)
    pi = torch.zeros(4, kern.vocab_size)
    pi[:, :n_data] = torch.rand(4, n_data, generator=g) + 0.2
    pi /= pi.sum(-1, keepdim=True)
    n = 3000
    out = generate(
        ProductOracle(pi),
        kern,
        SCHED,
        batch_size=n,
        seq_len=4,
        steps=4,
        generator=torch.Generator().manual_seed(2),
        sampler=sampler,
        cache=False,
    )
    counts = torch.nn.functional.one_hot(out.tokens, kern.vocab_size).sum(0).double()[:, :n_data]
    expected = n * pi[:, :n_data].double()
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert int(counts.sum()) == 4 * n  # no mask left
    assert stat < chi2.ppf(1 - 1e-4, 4 * (n_data - 1)), stat


def test_edit_budget_respected_per_step():
    k = 0.5
    kern = _kernel(k)
    out = generate(
        Noisy(),
        kern,
        SCHED,
        batch_size=8,
        seq_len=24,
        steps=6,
        generator=torch.Generator(),
        sampler=Confidence(),
        record=True,
    )
    c = out.trajectory.counts()
    assert bool((c.revised <= edit_budget(k, c.revealed)).all())
    assert int(c.revised.sum()) > 0 and int(c.remasked.sum()) == 0
    assert bool((out.tokens != M).all())  # all revealed after T steps
    per_step = torch.ceil(torch.tensor(24.0) / torch.arange(6, 0, -1))
    assert c.revealed[0].tolist() == [4] * 8 and int(per_step[0]) == 4


@pytest.mark.parametrize("k", [0.0, 0.1])
def test_cache_skips_calls_exactly_when_unchanged(k):
    kern = _kernel(k)
    x0 = torch.randint(V - 1, (2, L), generator=torch.Generator().manual_seed(3))
    runs = {}
    for cache in (True, False):
        den = Perfect(x0)
        runs[cache] = (
            generate(
                den,
                kern,
                SCHED,
                batch_size=2,
                seq_len=L,
                steps=32,
                cache=cache,
                generator=torch.Generator().manual_seed(4),
                record=True,
            ),
            den,
        )
    (hot, den_hot), (cold, den_cold) = runs[True], runs[False]
    assert torch.equal(hot.trajectory.states, cold.trajectory.states)
    states = hot.trajectory.states[:-1]  # the inputs of the 33 calls (32 steps + final)
    changed = [not torch.equal(a, b) for a, b in zip(states[:-1], states[1:], strict=True)]
    assert hot.nfe == den_hot.calls == 1 + sum(changed) < 33
    assert cold.nfe == den_cold.calls == 33


def test_guidance_zero_equals_unguided_and_counts_two_calls():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset("tiny", V, num_classes=3, n_layers=1, d_model=32)).eval()
    labels = torch.tensor([0, 2])
    common = dict(batch_size=2, seq_len=8, steps=4, sampler=Ancestral())
    guided = generate(
        model,
        _kernel(0.1),
        SCHED,
        generator=torch.Generator().manual_seed(9),
        class_labels=labels,
        guidance=0.0,
        **common,
    )

    def conditional(z, t, attention_mask=None, cond=None):
        return model(z, t, attention_mask, labels)

    plain = generate(
        conditional, _kernel(0.1), SCHED, generator=torch.Generator().manual_seed(9), **common
    )
    assert torch.equal(guided.tokens, plain.tokens) and guided.nfe == plain.nfe
    cfg = generate(
        model,
        _kernel(0.1),
        SCHED,
        generator=torch.Generator().manual_seed(9),
        class_labels=labels,
        guidance=2.0,
        cache=False,
        **common,
    )
    assert cfg.nfe == 2 * 5


def test_semi_ar_windows_and_finished_blocks_stay():
    widths = []

    class Spy(Noisy):
        def __call__(self, z, t, attention_mask=None, cond=None):
            widths.append(z.shape[1])
            return super().__call__(z, t)

    out = generate(
        Spy(),
        _kernel(0.1),
        SCHED,
        batch_size=2,
        seq_len=20,
        steps=3,
        record=True,
        generator=torch.Generator(),
        block_size=8,
        context_len=12,
    )
    assert max(widths) <= 12 and out.tokens.shape == (2, 20)
    states, labels = out.trajectory.states, out.trajectory.labels
    for b, end in enumerate((8, 16)):
        last = max(i for i, lab in enumerate(labels) if lab.startswith(f"block {b} "))
        assert bool((states[last + 1 :, :, :end] == states[last + 1, :, :end]).all())
    assert math.isfinite(out.wall_time) and out.nfe == len(widths)


@pytest.mark.parametrize(
    "key,bad", [("final", "best"), ("sampler", "beam"), ("grid", "log"), ("remdm_strategy", "x")]
)
def test_unknown_sampling_names_are_errors_at_the_edge(key, bad):
    """Strings pick classes once, in `build_sampler` (and the schema's Literal types)."""
    with pytest.raises(ValueError, match=f"sample.{key}"):
        load_config(None, [f"sample.{key}={bad}"])
    with pytest.raises(ValueError, match="sampler|final|grid|strategy"):
        extra = {"sampler": "remdm"} if key == "remdm_strategy" else {}
        build_sampler(SampleConfig(**{key: bad, **extra}))


def test_xdm_rank_dtype_reaches_the_sampler():
    """`sample.xdm_rank_dtype`: the authors' ranking ("logits") by default, float64 on request,
    anything else an error naming the key."""
    assert build_sampler(SampleConfig(sampler="xdm")).sampler.rank_dtype == "logits"
    plan = build_sampler(
        load_config(None, ["sample.sampler=xdm", "sample.xdm_rank_dtype=float64"]).sample
    )
    assert plan.sampler.rank_dtype == "float64"
    with pytest.raises(ValueError, match="sample.xdm_rank_dtype"):
        load_config(None, ["sample.xdm_rank_dtype=bfloat16"])


class MaskLoving:
    """Logits whose largest entry is the mask's: only the loop's filter (p_θ(m) = 0) keeps a
    sampler from drawing [MASK] on its p_θ route; records every call's cond."""

    def __init__(self):
        self.conds = []

    def __call__(self, z, t, attention_mask=None, cond=None):
        self.conds.append(cond)
        logits = torch.zeros(*z.shape, V)
        logits[..., M] = 10.0
        return logits


def test_the_corrector_denoises_through_the_filter_too():
    """The last step ends at α = 1 (t_end = 0) and no final step runs: the predictor reveals
    everything, the corrector (η = 1) re-masks about half and must reveal them again."""
    out = generate(MaskLoving(), _kernel(0.0), SCHED, batch_size=4, seq_len=L, steps=2,
                   generator=torch.Generator().manual_seed(0), sampler=PredictorCorrector(1.0),
                   grid=UniformT(t_end=0.0), final=None, cache=False)  # fmt: skip
    assert bool((out.tokens != M).all())


def test_generate_records_on_request_and_passes_the_labels_to_xdm():
    model, labels = MaskLoving(), torch.tensor([1, 2])
    out = generate(model, _kernel(0.1), SCHED, batch_size=2, seq_len=4, steps=2,
                   generator=None, sampler=XDM(), class_labels=labels)  # fmt: skip
    assert out.trajectory is None and bool((out.tokens != M).all())
    assert all(torch.equal(c, labels) for c in model.conds) and len(model.conds) == 2
    plain = generate(Noisy(), _kernel(0.1), SCHED, batch_size=2, seq_len=4, steps=2,
                     generator=torch.Generator())  # fmt: skip
    assert plain.trajectory is None
    with pytest.raises(ValueError) as refused:
        generate(model, _kernel(0.1), SCHED, batch_size=2, seq_len=4, steps=2, generator=None,
                 sampler=XDM(), guidance=1.0)  # fmt: skip
    assert str(refused.value).startswith(
        "the xdm sampler takes no LogitFilter or guidance; set XDM(temperature=..., cfg_scale=...)"
        " instead (got LogitFilter("
    )


def test_the_trajectory_labels_each_step_and_the_final_one_and_times_the_run():
    seen = []

    def model(z, t, attention_mask=None, cond=None):
        seen.append(t)
        return Noisy()(z, t)

    before = time.perf_counter()
    out = generate(model, _kernel(0.1), SCHED, batch_size=2, seq_len=4, steps=2,
                   generator=torch.Generator(), sampler=PredictorCorrector(0.5),
                   grid=UniformT(0.5), record=True, cache=False)  # fmt: skip
    assert 0.0 < out.wall_time <= time.perf_counter() - before
    assert out.trajectory.labels == ["block 0 step 1  t=1", "block 0 step 2  t=0.75",
                                     "block 0 final  t=0.5"]  # fmt: skip
    assert all(t is not None and t.shape == (2,) for t in seen) and len(seen) == 5  # 2 + 2 + 1
