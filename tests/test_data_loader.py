import numpy as np
import pytest
import torch

from xdlm.data import (
    Rows,
    ShardedLoader,
    TokenShards,
    embedded_corpus_path,
    prepare,
    read_documents,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(read_documents(embedded_corpus_path())[:150]))
    for mode in ("wrap", "pad"):
        prepare(corpus, root / mode, tokenizer="char", seq_len=32, mode=mode, valid_docs=20)
    return root


class IndexShards:
    """Stand-in shards whose row i is the single token i, so batches show their row indices."""

    split = "train"

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def rows(self, idx) -> Rows:
        return Rows(torch.as_tensor(np.asarray(idx), dtype=torch.int64)[:, None], None)


def _ids(batch) -> list[int]:
    return batch.tokens[:, 0].tolist()


def test_shards_rows(prepared):
    wrap = TokenShards(prepared / "wrap", "train")
    raw = np.fromfile(prepared / "wrap" / "train.bin", dtype=wrap.manifest.dtype)
    assert len(wrap) * wrap.seq_len == raw.size and wrap.vocab_size == wrap.manifest.vocab_size
    rows = wrap.rows([3, 0, 3])
    assert rows.tokens.dtype == torch.int64 and rows.tokens.shape == (3, 32)
    assert rows.attention_mask is None
    assert rows.tokens[1].tolist() == raw[:32].tolist() and torch.equal(rows[0][0], rows[0][2])
    pad = TokenShards(prepared / "pad", "valid")
    lengths = np.load(prepared / "pad" / "valid.lengths.npy")
    tokens, mask, _ = pad.rows(torch.arange(len(pad)))
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths.tolist()
    assert (tokens[~mask] == pad.manifest.pad_id).all()
    assert (tokens[mask] != pad.manifest.pad_id).all()
    assert pad.tokenizer().pad_id == pad.manifest.pad_id


def test_shards_errors(prepared, tmp_path):
    with pytest.raises(ValueError, match="no split 'test'"):
        TokenShards(prepared / "wrap", "test")
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        TokenShards(tmp_path, "train")
    with pytest.raises(IndexError):
        TokenShards(prepared / "wrap", "valid").rows([10**6])


def test_deterministic_and_seeded(prepared):
    shards = TokenShards(prepared / "wrap", "train")
    first = ShardedLoader(shards, 4, seed=7).next_batch()
    assert torch.equal(ShardedLoader(shards, 4, seed=7).next_batch().tokens, first.tokens)
    assert not torch.equal(ShardedLoader(shards, 4, seed=8).next_batch().tokens, first.tokens)
    ordered = ShardedLoader(shards, 4, shuffle=False).next_batch()
    assert torch.equal(ordered.tokens, shards.rows(range(4)).tokens)


def test_epoch_covers_rows_once_then_reshuffles():
    loader = ShardedLoader(IndexShards(103), 5, seed=0)
    epoch0 = list(loader)
    assert len(epoch0) == len(loader) == 20
    assert [b.step for b in epoch0] == list(range(20)) and {b.epoch for b in epoch0} == {0}
    rows0 = [i for b in epoch0 for i in _ids(b)]
    assert len(set(rows0)) == 100 and set(rows0) <= set(range(103))
    epoch1 = list(loader)
    assert epoch1[0].epoch == 1 and [_ids(b) for b in epoch1] != [_ids(b) for b in epoch0]
    assert [b.step for b in epoch1] == list(range(20))  # the whole next epoch, from its step 0
    assert loader.next_batch().epoch == 2  # next_batch rolls over on its own


def test_pad_batches_carry_masks(prepared):
    batch = ShardedLoader(TokenShards(prepared / "pad", "train"), 5).next_batch()
    assert batch.tokens.shape == batch.attention_mask.shape == (5, 32)
    assert batch.attention_mask.dtype == torch.bool and batch.attention_mask[:, 0].all()


@pytest.mark.parametrize("n", [64, 67, 70])
def test_ranks_disjoint_and_match_single_process(n):
    single = ShardedLoader(IndexShards(n), 4, seed=3)
    ranks = [ShardedLoader(IndexShards(n), 2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == n // 4
    seen = [set(), set()]
    for step in range(len(single) + 3):  # crosses an epoch boundary
        global_batch = _ids(single.next_batch())
        parts = [_ids(loader.next_batch()) for loader in ranks]
        assert set(parts[0]).isdisjoint(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(global_batch)
        if step < len(single):
            for r in range(2):
                seen[r].update(parts[r])
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == n // 4 * 4


def test_resume_equals_uninterrupted(prepared):
    shards = TokenShards(prepared / "pad", "train")
    steps = len(ShardedLoader(shards, 6)) + 4
    reference = ShardedLoader(shards, 6, seed=1)
    expected = [reference.next_batch() for _ in range(steps)]
    for cut in (0, 3, len(reference) - 1, len(reference), len(reference) + 2):  # + 2: epoch 1
        first = ShardedLoader(shards, 6, seed=1)
        for _ in range(cut):
            first.next_batch()
        resumed = ShardedLoader(shards, 6, seed=1)
        resumed.load_state_dict(first.state_dict())
        rest = [resumed.next_batch() for _ in range(steps - cut)]
        for got, want in zip(rest, expected[cut:], strict=True):
            assert (got.epoch, got.step) == (want.epoch, want.step)
            assert torch.equal(got.tokens, want.tokens)
            assert torch.equal(got.attention_mask, want.attention_mask)


def test_loader_errors(prepared):
    shards = TokenShards(prepared / "wrap", "valid")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedLoader(shards, len(shards), world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        ShardedLoader(shards, 1, rank=2, world_size=2)
    loader = ShardedLoader(shards, 1, seed=0)
    with pytest.raises(ValueError, match="seed 5"):
        loader.load_state_dict({"epoch": 0, "position": 0, "seed": 5})


def test_one_global_batch_is_the_least_a_split_may_hold():
    loader = ShardedLoader(IndexShards(8), 4, world_size=2, rank=1)  # exactly one: accepted
    assert len(loader) == 1 and loader.state_dict() == {"epoch": 0, "position": 0, "seed": 0}
    with pytest.raises(ValueError) as info:
        ShardedLoader(IndexShards(7), 4, world_size=2)
    assert str(info.value) == (
        "split 'train' has 7 rows, fewer than one global batch (batch_size 4 x world_size 2); "
        "lower batch_size or prepare more data / a shorter seq_len"
    )
    for kwargs in (
        {"batch_size": 0},
        {"batch_size": 1, "world_size": 0},
        {"batch_size": 1, "rank": -1},
    ):
        with pytest.raises(ValueError) as info:
            ShardedLoader(IndexShards(8), **kwargs)
        assert str(info.value).startswith("need batch_size >= 1 and 0 <= rank < world_size, got ")


def test_next_batch_rolls_into_the_next_epoch_at_its_step_0():
    loader = ShardedLoader(IndexShards(10), 3)  # the default seed is 0
    assert [_ids(b) for b in loader] == [_ids(b) for b in ShardedLoader(IndexShards(10), 3, seed=0)]
    later = ShardedLoader(IndexShards(10), 3)
    later.load_state_dict({"epoch": 1, "position": 0})  # a state without a seed: this loader's
    first = ShardedLoader(IndexShards(10), 3)
    batches = [first.next_batch() for _ in range(len(first) + 1)]
    assert (batches[-1].epoch, batches[-1].step) == (1, 0)
    assert _ids(batches[-1]) == _ids(later.next_batch())
    assert first.state_dict() == {"epoch": 1, "position": 1, "seed": 0}


def test_rows_take_indices_0_to_n_minus_1_only(prepared):
    shards = TokenShards(prepared / "wrap", "valid")
    n = len(shards)
    assert shards.rows([n - 1]).tokens.shape == (1, 32) and shards.rows([]).tokens.shape == (0, 32)
    for idx in ([n], [-1], [0, n + 5]):
        with pytest.raises(IndexError) as info:
            shards.rows(idx)
        assert str(info.value) == f"row index out of range [0, {n}): {min(idx)}..{max(idx)}"


def test_shards_default_to_train_and_name_the_splits_they_have(prepared):
    shards = TokenShards(prepared / "wrap")
    assert shards.split == "train" and shards.rows([0]).labels is None  # text: no labels
    with pytest.raises(ValueError) as info:
        TokenShards(prepared / "wrap", "test")
    assert str(info.value) == (
        f"{prepared / 'wrap'} has no split 'test' (has ['train', 'valid']); pass one of those or "
        "prepare with a validation share"
    )
