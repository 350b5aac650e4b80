"""Reading prepared shards: `TokenShards` (memmap rows) and a resumable `ShardedLoader`.

Order contract of `ShardedLoader` (deterministic, resumable, rank-consistent):
  epoch e uses the permutation `numpy.random.default_rng([seed, e]).permutation(N)` (identity
  when `shuffle=False`), keeps its first `S * B * W` entries, S = N // (B * W) steps per epoch,
  and rank r reads the strided slice `used[r::W]`, B at a time. So global step s of W ranks with
  batch B covers exactly the rows of step s of one rank with batch B * W, ranks are disjoint, and
  every rank gets S batches. `state_dict()` = (epoch, position); loading it resumes the sequence.

Example:
    shards = TokenShards("runs/data/austen-char", "train")
    loader = ShardedLoader(shards, batch_size=32, seed=0, rank=rank, world_size=world)
    batch = loader.next_batch()   # batch.tokens (B, L) int64, batch.attention_mask (B, L) | None
                                  # batch.labels (B,) int64 | None (labelled data, e.g. images)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from xdlm.data.integrity import check_ids, check_split, check_vocabulary
from xdlm.data.manifest import Manifest, load_manifest
from xdlm.data.tokenizers import TextTokenizer, load_tokenizer_dir


class Rows(NamedTuple):
    """Rows of a split: tokens LongTensor (n, L); attention_mask BoolTensor (n, L) or None
    (None in wrap mode, where every position is a real token; True = real token); labels
    LongTensor (n,) or None (the class of each row when the split has a labels file)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch: tokens (B, L) int64, attention_mask (B, L) bool or None, its epoch and step
    (index of the batch within the epoch), labels (B,) int64 or None (class of each row)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor | None
    epoch: int
    step: int
    labels: torch.Tensor | None = None


class TokenShards:
    """Memmap view of `{dir}/{split}.bin`, shape (N, L), plus lengths in pad mode and labels
    (N,) when the split has a labels file."""

    def __init__(self, directory: str | Path, split: str = "train"):
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory)
        if split not in self.manifest.splits:
            raise ValueError(
                f"{self.directory} has no split {split!r} (has {sorted(self.manifest.splits)}); "
                "pass one of those or prepare with a validation share"
            )
        self.split = split
        info = self.manifest.splits[split]
        shape = (info.rows, self.manifest.seq_len)
        check_vocabulary(self.directory, self.manifest)  # data/integrity.py
        checked = check_split(self.directory, self.manifest, split)
        self._lengths, self._labels = checked.lengths, checked.labels
        self._tokens = np.memmap(
            self.directory / info.file, dtype=self.manifest.dtype, mode="r", shape=shape
        )

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def __len__(self) -> int:
        return self._tokens.shape[0]

    def tokenizer(self) -> TextTokenizer:
        """The tokenizer saved with the dataset."""
        return load_tokenizer_dir(self.directory / "tokenizer")

    def rows(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> Rows:
        """Gather rows `idx` (n,) -> Rows(tokens (n, L) int64, attention_mask (n, L) | None,
        labels (n,) int64 | None)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)}): {idx.min()}..{idx.max()}")
        raw = self._tokens[idx]
        path = self.directory / self.manifest.splits[self.split].file
        check_ids(raw, self.vocab_size, str(path), row_ids=idx)
        tokens = torch.from_numpy(raw.astype(np.int64))
        labels = None
        if self._labels is not None:
            labels = torch.from_numpy(self._labels[idx].astype(np.int64))
        if self._lengths is None:
            return Rows(tokens, None, labels)
        lengths = torch.from_numpy(self._lengths[idx])
        mask = torch.arange(self.seq_len)[None, :] < lengths[:, None]
        return Rows(tokens, mask, labels)


class ShardedLoader:
    """Deterministic, resumable, rank-sharded batches over `TokenShards` (module docstring).

    Iterating yields the rest of the current epoch and then moves to the next epoch;
    `next_batch()` never ends (it rolls over epochs).
    """

    def __init__(
        self,
        shards: TokenShards,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                f"rank={rank}, world_size={world_size}"
            )
        if len(shards) < batch_size * world_size:
            raise ValueError(
                f"split {shards.split!r} has {len(shards)} rows, fewer than one global batch "
                f"(batch_size {batch_size} x world_size {world_size}); lower batch_size or "
                "prepare more data / a shorter seq_len"
            )
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Batches per epoch for this rank (S)."""
        return len(self.shards) // (self.batch_size * self.world_size)

    def _rank_order(self) -> np.ndarray:
        """This rank's row indices for the current epoch, (S * B,)."""
        if self._order_epoch != self.epoch:
            n = len(self.shards)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            else:
                perm = np.arange(n)
            used = perm[: len(self) * self.batch_size * self.world_size]
            self._order, self._order_epoch = used[self.rank :: self.world_size], self.epoch
        return self._order

    def next_batch(self) -> Batch:
        """The next batch, rolling over to the next epoch at the end of one."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        idx = self._rank_order()[start : start + self.batch_size]
        rows = self.shards.rows(idx)
        batch = Batch(rows.tokens, rows.attention_mask, self.epoch, self.position, rows.labels)
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Where the loader stands: the next batch is step `position` of `epoch`."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the seed must match (another seed is another order)."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"loader state was saved with seed {state['seed']}, this loader has seed "
                f"{self.seed}; build the loader with the saved seed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
