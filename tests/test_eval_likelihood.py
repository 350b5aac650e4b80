import math
import statistics

import pytest
import torch
from eval_toys import Toy
from torch import nn

from xdlm import MixedKernel, make_schedule
from xdlm.data import prepare
from xdlm.data.loader import Rows, TokenShards
from xdlm.eval.likelihood import (
    evaluate_rows,
    evaluate_split,
    sequence_bounds,
    shard_batches,
    summarize,
    time_nodes,
)

V, MASK, L = 9, 8, 12


class Uniform(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, z, t, attention_mask=None, cond=None):
        return torch.zeros(*z.shape, V) + self.p


def _data(n=12, seed=0):
    return torch.randint(0, MASK, (n, L), generator=torch.Generator().manual_seed(seed))


def _batches(x, bs, mask=None):
    for s in range(0, len(x), bs):
        ids = torch.arange(s, min(s + bs, len(x)))
        yield ids, Rows(x[ids], None if mask is None else mask[ids])


SCHED = make_schedule("loglinear")


@pytest.mark.parametrize("discrete", [None, 3])
def test_seed_picks_the_noise(discrete):
    """Same seed, same bound; another seed, other draws (both bounds, the discrete one too)."""
    x, kern, model = _data(), MixedKernel(V, MASK, 0.1), Toy(V)

    def run(seed):
        kw = dict(discrete_steps=discrete, seed=seed, t_samples=2)
        return evaluate_rows(model, kern, SCHED, _batches(x, 6), **kw).nats

    assert run(1) == run(1) and run(1) != run(2)


@pytest.mark.parametrize("discrete", [None, 5])
def test_batched_sum_reduction_equals_single_pass(discrete):
    x, kern, model = _data(), MixedKernel(V, MASK, 0.1), Toy(V)
    mask = torch.arange(L)[None] < torch.randint(3, L + 1, (len(x), 1))
    kw = dict(discrete_steps=discrete, seed=3, t_samples=3)
    one = evaluate_rows(model, kern, SCHED, _batches(x, 12, mask), **kw)
    many = evaluate_rows(model, kern, SCHED, _batches(x, 5, mask), **kw)
    assert one.tokens == many.tokens == int(mask.sum())
    assert one.nats == pytest.approx(many.nats, rel=1e-5)
    assert one.se_nats_per_token == pytest.approx(many.se_nats_per_token, rel=1e-4)


def test_se_shrinks_with_more_t_samples():
    x, kern, model = _data(32), MixedKernel(V, MASK, 0.1), Toy(V)
    se = [
        evaluate_rows(model, kern, SCHED, _batches(x, 16), t_samples=n).se_nats_per_token
        for n in (1, 16)
    ]
    assert se[1] < 0.5 * se[0]


@pytest.mark.parametrize("method", ["stratified", "midpoint", "gauss-legendre"])
def test_uniform_denoiser_mdlm_reference(method):
    """k = 0, p_θ uniform over the V − 1 data ids: E ℓ_t = (−α')·log(V − 1) for every t."""
    x, kern = _data(64), MixedKernel.mdlm(V, MASK)
    res = evaluate_rows(Uniform(), kern, SCHED, _batches(x, 32), t_samples=8, method=method)
    expected = (1 - 1e-3) * math.log(V - 1)
    assert abs(res.nats_per_token - expected) < 4 * res.se_nats_per_token + 1e-6
    assert res.bits_per_token == pytest.approx(res.nats_per_token / math.log(2))
    assert res.ppl == pytest.approx(math.exp(res.nats_per_token))
    lo, hi = res.ci95_ppl
    assert lo < res.ppl < hi


@pytest.mark.parametrize("k", [0.0, 0.1, 1.0])
def test_discrete_bound_tightens_towards_continuous(k):
    """d_2 > d_64 ≈ continuous, per sequence on the same 300 sequences: the paired difference
    cancels the data variance, so the tolerance (4 paired SE ≈ 0.07 nats + 0.01 for d_64's
    O(1/T) gap; d_2 − d_64 ≈ 0.04) is below the effect of dropping the ḡ term (0.13-0.26)."""
    kern = MixedKernel(V, None, 1.0) if k == 1.0 else MixedKernel(V, MASK, k)
    x, model = _data(300), Toy(V)
    bound = lambda **kw: sequence_bounds(model, kern, SCHED, _batches(x, 300), **kw).nats  # noqa: E731
    cont = bound(t_samples=48, method="stratified")
    d2, d64 = bound(discrete_steps=2), bound(discrete_steps=64)
    assert bool(torch.isfinite(d2).all()) and float(d2.mean()) > float(d64.mean())
    diff = (d64 - cont) / L  # nats/token, per sequence
    se = float(diff.std()) / math.sqrt(len(diff))
    assert abs(float(diff.mean())) < 4 * se + 0.01, (float(diff.mean()), se)


def test_oracle_denoiser_gives_near_zero():
    x, kern = _data(4), MixedKernel(V, MASK, 0.1)

    class Oracle(Uniform):
        def forward(self, z, t, attention_mask=None, cond=None):
            return 60.0 * nn.functional.one_hot(x, V).float()

    res = evaluate_rows(Oracle(), kern, SCHED, _batches(x, 4), t_samples=4)
    assert abs(res.nats_per_token) < 1e-3


def test_summarize_ratio_estimator():
    nats, toks = torch.tensor([10.0, 20.0, 40.0]), torch.tensor([5, 10, 10])
    res = summarize(nats, toks)
    r = 70 / 25
    resid = nats - r * toks
    se = math.sqrt(float((resid**2).sum()) / 6) / (25 / 3)
    assert res.nats_per_token == pytest.approx(r)
    assert res.se_nats_per_token == pytest.approx(se)
    assert res.ci95_nats_per_token[1] == pytest.approx(r + 1.959963984540054 * se)
    with pytest.raises(ValueError, match="no tokens"):
        summarize(torch.zeros(0), torch.zeros(0))


def test_summarize_one_and_two_sequences_and_empty_input():
    one = summarize(torch.tensor([6.0]), torch.tensor([1]))  # a single token is enough
    assert one.nats_per_token == 6.0 and math.isnan(one.se_nats_per_token)
    two = summarize(torch.tensor([3.0, 5.0]), torch.tensor([2, 2]))  # SE = stdev/(√2·c) = 0.5
    assert two.nats_per_token == 2.0 and two.se_nats_per_token == pytest.approx(0.5)
    for nats, tokens in (([], []), ([1.0], [0]), ([1.0, 2.0], [0, 0])):
        with pytest.raises(ValueError, match="no tokens were evaluated"):
            summarize(torch.tensor(nats), torch.tensor(tokens, dtype=torch.int64))


def test_se_is_the_standard_error_of_the_mean_for_equal_lengths():
    """Equal lengths c: R = mean(n)/c and SE(R) = stdev(n)/(√N·c), the textbook SEM."""
    nats = [31.0, 12.5, 27.0, 18.25, 40.0, 22.0]
    res = summarize(torch.tensor(nats), torch.full((6,), 8))
    assert res.nats_per_token == pytest.approx(statistics.mean(nats) / 8)
    assert res.se_nats_per_token == pytest.approx(statistics.stdev(nats) / math.sqrt(6) / 8)
    lo, hi = res.ci95_nats_per_token
    assert hi - lo == pytest.approx(2 * 1.959963984540054 * res.se_nats_per_token)


def test_se_matches_the_spread_of_the_ratio_estimator():
    """Over 4000 simulated evaluations of N = 50 sequences of random lengths, the mean reported
    SE equals the observed standard deviation of R (the SE's definition) within 5 %."""
    g = torch.Generator().manual_seed(0)
    c = torch.randint(5, 40, (4000, 50), generator=g)
    n = c * 2.0 + torch.randn(4000, 50, generator=g, dtype=torch.float64) * c.double().sqrt() * 3
    results = [summarize(n[i], c[i]) for i in range(len(c))]
    spread = statistics.stdev([res.nats_per_token for res in results])
    mean_se = statistics.mean([res.se_nats_per_token for res in results])
    assert mean_se == pytest.approx(spread, rel=0.05)


def test_time_nodes_cover_interval():
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    t, w = time_nodes(4, "stratified", 0.1, gens)
    assert t.shape == (3, 4) and float(w.sum()) == pytest.approx(1.0)
    strata = ((t - 0.1) / 0.9 * 4).floor()
    assert torch.equal(strata, torch.arange(4.0).expand(3, 4))
    t, w = time_nodes(5, "gauss-legendre", 0.0, gens)
    assert float((w * t[0].double() ** 3).sum()) == pytest.approx(0.25)  # ∫_0^1 t³ dt
    with pytest.raises(ValueError, match="unknown time method"):
        time_nodes(2, "trapezoid", 0.0, gens)
    t, w = time_nodes(4, "midpoint", 0.2, gens)  # t_j = t_min + (1 − t_min)·(j + ½)/n
    torch.testing.assert_close(t, torch.tensor([0.3, 0.5, 0.7, 0.9]).expand(3, 4))
    torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))
    for n, t_min in ((0, 0.0), (2, 1.0), (2, -0.1)):
        with pytest.raises(ValueError, match="need t_samples >= 1 and t_min in"):
            time_nodes(n, "midpoint", t_min, gens)


def test_evaluate_split_on_prepared_pad_data(tmp_path):
    text = "\n\n".join(f"doc {i} " + "abc " * (i % 5 + 1) for i in range(30))
    (tmp_path / "c.txt").write_text(text)
    man = prepare([tmp_path / "c.txt"], tmp_path / "d", tokenizer="char", seq_len=16, mode="pad",
                  valid_docs=8)  # fmt: skip
    kern = MixedKernel(man.vocab_size, man.mask_id, 0.1)
    res = evaluate_split(Toy(man.vocab_size), kern, SCHED, tmp_path / "d", "valid", batch_size=3)
    assert res.tokens == man.splits["valid"].tokens and res.sequences == man.splits["valid"].rows
    with pytest.raises(ValueError, match="vocab_size"):
        evaluate_split(Toy(V), MixedKernel(V, MASK, 0.1), SCHED, tmp_path / "d", "valid")
    # max_batches keeps the first max_batches · batch_size rows; kwargs reach the bound
    model, shards = Toy(man.vocab_size), TokenShards(tmp_path / "d", "valid")
    part = evaluate_split(model, kern, SCHED, tmp_path / "d", batch_size=2, max_batches=2,
                          t_samples=2, seed=4)  # fmt: skip
    ids = torch.arange(4)
    want = evaluate_rows(model, kern, SCHED, [(ids, shards.rows(ids))], t_samples=2, seed=4)
    assert part == want and part.sequences == 4
    one = list(shard_batches(shards, 1, max_rows=3))
    assert [ids.tolist() for ids, _ in one] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(shard_batches(shards, 0))
    with pytest.raises(ValueError, match="no batch was evaluated"):
        evaluate_rows(model, kern, SCHED, [])


def test_zero_shot_two_corpora_with_rules(tmp_path):
    from xdlm.data import load_tokenizer
    from xdlm.eval.zeroshot import zero_shot

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(f"the cat {i} sat" for i in range(20)))
    b.write_text("\n\n".join(f"a dog {i} ran far" for i in range(20)))
    tok = load_tokenizer("char", corpus_texts=[a.read_text() + b.read_text()])
    kern = MixedKernel(tok.vocab_size, tok.mask_id, 0.1)
    out = zero_shot(Toy(tok.vocab_size), kern, SCHED, tok, [a, str(b)], seq_len=16,
                    max_tokens=40, batch_size=2, t_samples=2)  # fmt: skip
    assert list(out) == [str(a), str(b)]
    for res in out.values():
        assert res["tokens"] == 48 and res["tokens_available"] > 48  # ⌈40/16⌉ = 3 rows
        assert res["rules"]["mode"] == "wrap" and res["rules"]["bos_id"] == tok.bos_id
    with pytest.raises(ValueError, match="tokenizer has"):
        zero_shot(Toy(V), MixedKernel(V, MASK, 0.1), SCHED, tok, [a], seq_len=16)


# ------------------------------------------------------------------ discrete bound vs brute force


class ContextFree(nn.Module):
    """Logits (L, V) per position, ignoring z_t and t: the bound factorises over positions."""

    def __init__(self, vocab: int = V, seed: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(2.0 * torch.randn(L, vocab, generator=g))

    def forward(self, z, t, attention_mask=None, cond=None):
        return self.logits.expand(z.shape[0], -1, -1)


def _dense_p(model, kern):
    """p_θ (L, V) float64 with p_θ(m) = 0, computed here (not via the kernel)."""
    lg = model.logits.detach().double().clone()
    if kern.mask_id is not None:
        lg[:, kern.mask_id] = float("-inf")
    return lg.softmax(-1)


def _kl(q, p):
    """Σ_e q(e)·log(q(e)/p(e)) over the last dim, 0·log 0 = 0."""
    return torch.where(q > 0, q * (q.clamp_min(1e-300).log() - p.clamp_min(1e-300).log()), 0.0)


def _exact_discrete_bound(kern, p, alphas):
    """Per position l and clean x: KL(q(z_T|x) ‖ r) + Σ_i E_{q(z_{t_i}|x)} KL(q(z_s|z_t, x) ‖
    p_θ(z_s|z_t)), enumerating z_t and z_s over V with dense matrices. p (L, V); alphas
    α_{t_0} = 1 > ... > α_{t_T} (float64 list). Returns (L, V): the bound for x_l = x."""
    n = kern.vocab_size
    r = torch.full((n,), kern.k / n, dtype=torch.float64)
    if kern.mask_id is not None:
        r[kern.mask_id] += 1.0 - kern.k
    eye = torch.eye(n, dtype=torch.float64)
    q = lambda a: a * eye + (1.0 - a) * r  # noqa: E731  q(a)[x, z] = q(z_a = z | x)
    out = _kl(q(alphas[-1]), r).sum(-1).expand(L, n).clone()  # the prior term
    for at, as_ in zip(alphas[1:], alphas[:-1], strict=True):
        Q = q(at / as_)  # Q[e, z] = Q_{t|s}(z_t = z | z_s = e)
        joint_x = q(as_)[:, :, None] * Q[None]  # [x, e, z] = q(z_s = e | x)·Q(z | e)
        post_x = joint_x / joint_x.sum(1, keepdim=True).clamp_min(1e-300)  # q(z_s = e | z, x)
        joint_p = torch.einsum("lx,xez->lez", p, joint_x)
        post_p = joint_p / joint_p.sum(1, keepdim=True).clamp_min(1e-300)  # p_θ(z_s = e | z)
        kl = _kl(post_x[None], post_p[:, None]).sum(2)  # (L, x, z)
        out += (q(at)[None] * kl).sum(-1)  # E over z_t ~ q(· | x)
    return out


@pytest.mark.parametrize("k", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("schedule", [SCHED, make_schedule("cosine", eps=0.3)])
def test_one_step_discrete_bound_is_exactly_the_denoiser_nll(k, schedule):
    """T = 1: z_1 ~ r carries no information, so NELBO_1 = KL(r ‖ r) + E[−log p_θ(x | z_1)] =
    −Σ_l log p_θ(x_l), whatever z_1 was drawn; dropping α_T = 0 breaks this at every z_1 = x."""
    kern = MixedKernel(V, None, 1.0) if k == 1.0 else MixedKernel(V, MASK, k)
    x, model = _data(64), ContextFree()
    res = evaluate_rows(model, kern, schedule, _batches(x, 32), discrete_steps=1)
    nll = -_dense_p(model, kern).log().gather(-1, x.T).T.sum()
    assert res.nats == pytest.approx(float(nll), rel=1e-6)


@pytest.mark.parametrize("k", [0.0, 0.1, 1.0])
def test_discrete_bound_matches_exact_enumeration(k):
    """NELBO_T (T = 3) averaged over many sequences equals prior KL + Σ_i E KL_i computed by
    enumeration (dense Bayes), within 4 SE; with α_T = 0 the prior KL term is exactly 0."""
    kern = MixedKernel(V, None, 1.0) if k == 1.0 else MixedKernel(V, MASK, k)
    schedule, T = make_schedule("cosine", eps=0.3), 3  # α_1 = 0.3: the last step matters
    x, model = _data(400, seed=2), ContextFree()
    grid = torch.arange(T + 1, dtype=torch.float32) / T
    alphas = [1.0] + [float(a) for a in schedule.alpha(grid)[1:-1]] + [0.0]
    table = _exact_discrete_bound(kern, _dense_p(model, kern), alphas)  # (L, V)
    exact = table.gather(-1, x.T).T.sum(-1)  # (N,)
    est = sequence_bounds(model, kern, schedule, _batches(x, 200), discrete_steps=T, seed=1)
    diff = est.nats - exact
    se = float(diff.std()) / math.sqrt(len(diff))
    assert abs(float(diff.mean())) < 4 * se + 1e-9, (float(diff.mean()), se)
