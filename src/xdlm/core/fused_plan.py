"""Rows per chunk of the fused loss, chosen by timing the real chunks of the first calls.

Bigger chunks make the three matmuls of a chunk more efficient and cut the passes over the
∂W accumulator (V, D) (each chunk adds a rank-n update to it); smaller chunks keep the (n, V)
buffers nearer the cache and cost less memory. Which wins depends on the machine, V and D, so a
`ChunkProbe` per (device, V, D, dtype, variant, threads) measures it on the work it has to do
anyway: the first chunks use each candidate size in turn and time the whole per-chunk work per
row (no extra computation, only some chunks of a less good size); once every candidate has
`PROBE_SAMPLES` timings the fastest is kept for the rest of the process. Candidates are the
`N_CANDIDATES` largest powers of two ≥ `MIN_ROWS` with at most `MAX_CHUNK_ELEMENTS` logits per
chunk and at most a quarter of the rows of the first call. On a shared machine one timing can be
disturbed; the minimum of the samples is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

MAX_CHUNK_ELEMENTS = 1 << 25  # logits per chunk buffer: 128 MB of float32 (the memory cap)
MIN_ROWS, N_CANDIDATES, PROBE_SAMPLES = 16, 4, 2


@dataclass
class ChunkProbe:
    """Per-row seconds of each candidate chunk size; `chosen` once all have been sampled."""

    candidates: tuple[int, ...]
    per_row_s: dict[int, list[float]] = field(default_factory=dict)

    @property
    def chosen(self) -> int | None:
        if any(len(self.per_row_s.get(c, ())) < PROBE_SAMPLES for c in self.candidates):
            return None
        return min(self.candidates, key=lambda c: min(self.per_row_s[c]))

    def next_size(self) -> int:
        """The chosen size, or while probing the least-sampled candidate (smallest first)."""
        best = self.chosen
        if best is not None:
            return best
        return min(self.candidates, key=lambda c: (len(self.per_row_s.get(c, ())), c))

    def record(self, size: int, rows: int, seconds: float) -> None:
        """One chunk of `rows` rows planned at `size` took `seconds` (ignored once chosen)."""
        if self.chosen is None and 2 * rows >= size:
            self.per_row_s.setdefault(size, []).append(seconds / rows)


_PROBES: dict[tuple, ChunkProbe] = {}


def candidates(n_rows: int, vocab_size: int) -> tuple[int, ...]:
    """Powers of two from MIN_ROWS up to the memory cap and a quarter of n_rows (so the two
    chunk buffers stay below half of one (N, V) tensor); the largest few."""
    cap = max(MIN_ROWS, min(MAX_CHUNK_ELEMENTS // vocab_size, n_rows // 4))
    sizes = [MIN_ROWS]
    while sizes[-1] * 2 <= cap:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes[-N_CANDIDATES:])


def probe_for(
    device: torch.device, vocab_size: int, dim: int, dtype: torch.dtype, variant: str, n_rows: int
) -> ChunkProbe:
    """The process-wide probe for this configuration (created on first use)."""
    key = (str(device), vocab_size, dim, dtype, variant, torch.get_num_threads())
    if key not in _PROBES:
        _PROBES[key] = ChunkProbe(candidates(n_rows, vocab_size))
    return _PROBES[key]


def row_chunks(n_rows: int, probe: ChunkProbe | None, fixed: int | None, device: torch.device):
    """Yield (start, end) row ranges of `fixed` rows, or of the probe's sizes.

    While the probe is open, the loop body between two yields is timed and recorded (CUDA is
    synchronised around it so the time is the chunk's own).
    """
    s = 0
    while s < n_rows:
        size = fixed if fixed is not None else probe.next_size()
        e = min(n_rows, s + size)
        timing = fixed is None and probe.chosen is None
        if timing:
            _sync(device)
            start = time.perf_counter()
        yield s, e
        if timing:
            _sync(device)
            probe.record(size, e - s, time.perf_counter() - start)
        s = e


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
