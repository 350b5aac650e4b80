"""xdlm.data.synthetic: the hidden Markov law's forward algorithm against brute-force enumeration,
its sampler against the exact law (chi-square), its entropy estimate, and the written dataset."""

from __future__ import annotations

import itertools
import math
import shutil

import pytest
import torch
from scipy import stats

from xdlm.data.loader import TokenShards
from xdlm.data.synthetic import HiddenMarkovLaw, load_law, topic_hmm, write_dataset
from xdlm.eval.oracle import all_sequences


def _tiny_law(seed: int = 0) -> HiddenMarkovLaw:
    """H = 3 hidden states, D = 3 tokens, random dense parameters."""
    gen = torch.Generator().manual_seed(seed)

    def rows(n: int, m: int) -> torch.Tensor:
        p = torch.rand(n, m, generator=gen, dtype=torch.float64) + 0.05
        return p / p.sum(-1, keepdim=True)

    return HiddenMarkovLaw(rows(1, 3)[0], rows(3, 3), rows(3, 3))


def _brute_force(law: HiddenMarkovLaw, x: list[int]) -> float:
    """p(x) = Σ over every hidden path h of π(h_1)·E(h_1, x_1)·Π A(h_l, h_{l+1})·E(h_{l+1}, x)."""
    total = 0.0
    for h in itertools.product(range(len(law.initial)), repeat=len(x)):
        p = float(law.initial[h[0]] * law.emission[h[0], x[0]])
        for pos in range(1, len(x)):
            p *= float(law.transition[h[pos - 1], h[pos]] * law.emission[h[pos], x[pos]])
        total += p
    return total


@pytest.mark.parametrize("law", [_tiny_law(0), _tiny_law(1), topic_hmm(3, 2, 2, seed=4)])
def test_forward_matches_brute_force(law):
    x = all_sequences(law.num_tokens, 4)
    exact = torch.tensor([_brute_force(law, row) for row in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(law.log_prob(x).exp(), exact, rtol=1e-10, atol=0)
    assert abs(float(exact.sum()) - 1.0) < 1e-12


def test_samples_pass_chi_square():
    law = _tiny_law(2)
    x = law.sample(20_000, 3, torch.Generator().manual_seed(0))
    seqs = all_sequences(3, 3)
    index = (x * torch.tensor([9, 3, 1])).sum(-1)
    observed = torch.bincount(index, minlength=len(seqs)).double()
    expected = law.log_prob(seqs).exp() * len(x)
    assert float(expected.min()) > 5  # the chi-square approximation holds
    p_value = stats.chisquare(observed.numpy(), expected.numpy()).pvalue
    assert p_value > 1e-3


def test_entropy_estimate_covers_the_exact_entropy():
    law = _tiny_law(3)
    p = law.log_prob(all_sequences(3, 4)).exp()
    exact = float(-(p * p.log()).sum()) / 4
    est = law.entropy(4, 4000, torch.Generator().manual_seed(1), batch=1000)
    assert est.samples == 4000 and est.se > 0
    assert abs(est.mean - exact) < 4 * est.se


def test_topic_hmm_keeps_the_topic():
    law = topic_hmm(num_tokens=8, topics=2, local_states=3, seed=0)
    blocks = law.transition.reshape(2, 3, 2, 3)
    assert float(blocks[0, :, 1].sum()) == 0.0 and float(blocks[1, :, 0].sum()) == 0.0
    assert law.num_tokens == 8 and law.initial.shape == (6,)


def test_bad_laws_and_ids_raise():
    law = _tiny_law()
    with pytest.raises(ValueError, match="rows summing to 1"):
        HiddenMarkovLaw(law.initial, law.transition * 2, law.emission)
    with pytest.raises(ValueError, match=r"transition \(H, H\)"):
        HiddenMarkovLaw(law.initial, law.transition[:2], law.emission)
    with pytest.raises(ValueError, match="ids in 0..2"):
        law.log_prob(torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="positive sizes"):
        topic_hmm(num_tokens=0)


def test_written_dataset_round_trips(tmp_path):
    law = topic_hmm(num_tokens=5, topics=2, local_states=2, seed=1)
    manifest = write_dataset(law, tmp_path / "d", seq_len=6, rows={"train": 10, "valid": 4}, seed=3)
    assert (manifest.vocab_size, manifest.mask_id, manifest.seq_len) == (6, 5, 6)
    again = load_law(tmp_path / "d")
    torch.testing.assert_close(again.emission, law.emission)
    rows = TokenShards(tmp_path / "d", "valid").rows(torch.arange(4)).tokens
    assert rows.shape == (4, 6) and int(rows.max()) < 5
    assert torch.isfinite(again.log_prob(rows)).all()
    with pytest.raises(FileExistsError, match="already exists"):
        write_dataset(law, tmp_path / "d", seq_len=6, rows={"train": 1}, seed=0)


def test_seed_intervals_match_scipy():
    from xdlm.eval.seeds import paired_difference, t_interval

    xs = [2.41, 2.45, 2.40, 2.47]
    ci = t_interval(xs)
    lo, hi = stats.t.interval(0.95, 3, loc=sum(xs) / 4, scale=stats.sem(xs))
    assert math.isclose(ci.lo, lo) and math.isclose(ci.hi, hi) and ci.n == 4
    d = paired_difference([3.0, 4.0, 5.5], [1.0, 2.0, 3.0])
    assert math.isclose(d.mean, 2.1666666666666665) and d.excludes_zero()
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_a_law_is_refused_at_each_broken_shape_or_sign():
    law = _tiny_law()
    shapes = "need initial (H,), transition (H, H), emission (H, D); got "
    with pytest.raises(ValueError) as info:
        HiddenMarkovLaw(law.initial, law.transition, law.emission[:2])
    assert str(info.value) == shapes + "(3,), (3, 3), (2, 3)"
    with pytest.raises(ValueError, match=r"^need initial .*\(3,\), \(3, 3\), \(9,\)$"):
        HiddenMarkovLaw(law.initial, law.transition, law.emission.reshape(-1))
    signed = torch.tensor([[1.5, -0.5, 0.0]] * 3, dtype=torch.float64)  # rows sum to 1
    with pytest.raises(ValueError) as info:
        HiddenMarkovLaw(law.initial, law.transition, signed)
    assert str(info.value) == "emission must be non-negative with rows summing to 1"
    with pytest.raises(ValueError, match="^initial must be non-negative"):
        HiddenMarkovLaw(law.initial * 2, law.transition, law.emission)


def test_a_deterministic_law_is_sampled_exactly():
    """Rows with a single possible outcome (one-hot): every draw is that outcome."""
    one_hot = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    law = HiddenMarkovLaw(torch.tensor([1.0, 0.0], dtype=torch.float64), one_hot, torch.eye(2,
                          dtype=torch.float64))  # fmt: skip
    x = law.sample(3, 5, torch.Generator().manual_seed(0))
    assert x.tolist() == [[0, 1, 0, 1, 0]] * 3  # state 0 first, then alternating


def test_log_prob_takes_ids_up_to_d_minus_1_in_a_2d_batch():
    law = _tiny_law()
    assert torch.isfinite(law.log_prob(torch.tensor([[0, 2, 1]]))).all()
    for bad in (torch.tensor([[0, -1]]), torch.tensor([[3, 0]]), torch.tensor([0, 1])):
        with pytest.raises(ValueError) as info:
            law.log_prob(bad)
        assert str(info.value) == "x must be (B, L) ids in 0..2"


def test_entropy_is_the_mean_nll_per_token_over_batches_with_its_standard_error():
    law = _tiny_law(4)
    est = law.entropy(5, 250, torch.Generator().manual_seed(7), batch=100)  # 100 + 100 + 50
    gen = torch.Generator().manual_seed(7)
    nll = torch.cat([-law.log_prob(law.sample(n, 5, gen)) for n in (100, 100, 50)]) / 5
    assert est.samples == 250
    assert est.mean == pytest.approx(float(nll.mean()), rel=1e-12)
    assert est.se == pytest.approx(float(nll.std()) / math.sqrt(250), rel=1e-12)
    default = law.entropy(1, 4097, torch.Generator().manual_seed(3))  # batches of 4096 + 1
    assert default == law.entropy(1, 4097, torch.Generator().manual_seed(3), batch=4096)


def test_topic_hmm_defaults_and_smallest_sizes():
    default, explicit = topic_hmm(), topic_hmm(32, 4, 8, 0.3, 0.1, seed=0)
    for name in ("initial", "transition", "emission"):
        assert torch.equal(getattr(default, name), getattr(explicit, name))
        assert getattr(default, name).dtype == torch.float64
    tiny = default.emission < 1e-6  # sparse Dirichlet rows, yet no probability exactly 0
    assert 0.2 < float(tiny.double().mean()) < 0.5 and float(default.emission.min()) > 0
    assert default.initial.shape == (32,) and float(default.initial[0]) == 1 / 32
    one = topic_hmm(num_tokens=1, topics=1, local_states=1)  # every size exactly 1: allowed
    assert one.transition.tolist() == [[1.0]] and one.emission.tolist() == [[1.0]]
    for sizes in ((2, 0, 1), (2, 1, 0)):
        with pytest.raises(ValueError) as info:
            topic_hmm(*sizes)
        assert (
            str(info.value) == f"need positive sizes, got D={sizes[0]}, C={sizes[1]}, S={sizes[2]}"
        )


def test_the_written_rows_are_the_law_s_draws_in_split_order(tmp_path):
    import numpy as np

    law = topic_hmm(num_tokens=5, topics=2, local_states=2, seed=1)
    m = write_dataset(law, tmp_path / "d", seq_len=4, rows={"valid": 3, "train": 2}, seed=9)
    write_dataset(law, tmp_path / "new" / "parent" / "d", seq_len=4, rows={"train": 1}, seed=9)
    assert (tmp_path / "new" / "parent" / "d" / "manifest.json").is_file()
    shutil.rmtree(tmp_path / "new")
    gen = torch.Generator().manual_seed(9)
    want = {"valid": law.sample(3, 4, gen), "train": law.sample(2, 4, gen)}
    for split, rows in want.items():
        got = np.fromfile(tmp_path / "d" / f"{split}.bin", dtype=np.uint16).reshape(-1, 4)
        assert got.tolist() == rows.tolist()
        info = m.splits[split]
        assert (info.rows, info.tokens, info.documents) == (len(rows), rows.numel(), len(rows))
    assert (m.pad_id, m.bos_id, m.eos_id, m.mode, m.dtype) == (None, None, None, "wrap", "uint16")
    assert m.tokenizer == {"kind": "hmm", "law": law.to_dict()} and m.sources == ["hmm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary left
    with pytest.raises(RuntimeError):  # train written, then the draw of valid fails
        write_dataset(law, tmp_path / "f", seq_len=4, rows={"train": 2, "valid": -1}, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # a failed write leaves none either


def test_load_law_refuses_a_dataset_the_law_did_not_write(tmp_path):
    from xdlm.data import prepare

    (tmp_path / "c.txt").write_text("a b c d e f g h\n\ni j k l m n o\n")
    prepare(tmp_path / "c.txt", tmp_path / "text", tokenizer="char", seq_len=4, valid_fraction=0)
    with pytest.raises(
        ValueError,
        match=r"text was not written by xdlm\.data\.synthetic \("
        r"tokenizer \{'kind': 'char'",
    ):
        load_law(tmp_path / "text")


def test_a_full_disk_leaves_no_temporary_directory(small_fs):
    from run_fixtures import fill_disk

    fill_disk(small_fs, 64 * 1024)
    with pytest.raises(OSError, match="No space left on device"):  # 128 KB of rows
        write_dataset(_tiny_law(), small_fs / "d", seq_len=64, rows={"train": 1000}, seed=0)
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]
