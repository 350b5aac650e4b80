"""A known data law: a hidden Markov model whose exact likelihood is computable, as a dataset.

    law = topic_hmm(num_tokens=32, topics=4, local_states=8, seed=0)
    x = law.sample(1000, 64, torch.Generator().manual_seed(1))   # (N, L) int64 in 0..D−1
    nll = -law.log_prob(x)                                       # (N,) nats, exact
    h = law.entropy(64, 20_000, torch.Generator().manual_seed(2))  # H(X_{1:L})/L ± SE
    write_dataset(law, "runs/knownlaw/data", seq_len=64, rows={"train": 100_000, "valid": 512})

The law: hidden states h_1..h_L with p(h_1) = π (H,), p(h_{l+1} | h_l) = A (H, H), and tokens
p(x_l | h_l) = E (H, D). p(x) = Σ_h π(h_1)·E(h_1, x_1)·Π_l A(h_l, h_{l+1})·E(h_{l+1}, x_{l+1}) by
the forward algorithm in log space (`log_prob`). `topic_hmm` gives it long-range structure: the
hidden state is (topic c, local state s); the topic is drawn once per sequence and never changes
(A is block-diagonal), so a token anywhere informs every other position; within a topic s follows
its own Markov chain, and each (c, s) emits from a sparse Dirichlet row over all D tokens.

The written dataset is a prepared directory (`xdlm.data.manifest`): V = D + 1 with the mask id D,
no tokenizer (like image-token data), `tokenizer = {"kind": "hmm", ...}` holding the law itself,
so `load_law(dir)` rebuilds it and any checkpoint trained on it can be scored exactly.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from xdlm.data.manifest import MANIFEST_FILE, Manifest, SplitInfo, load_manifest, sha256_file
from xdlm.data.prepare import _library_version

_PARTS = ("initial", "transition", "emission")


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo mean with its standard error (nats per token)."""

    mean: float
    se: float
    samples: int


@dataclass(frozen=True)
class HiddenMarkovLaw:
    """p(x) of a hidden Markov model: initial π (H,), transition A (H, H) and emission E (H, D),
    all float64 and row-stochastic (module docstring)."""

    initial: Tensor
    transition: Tensor
    emission: Tensor

    def __post_init__(self) -> None:
        h = self.initial.shape[0]
        if self.transition.shape != (h, h) or self.emission.ndim != 2 or len(self.emission) != h:
            raise ValueError(
                f"need initial (H,), transition (H, H), emission (H, D); got "
                f"{tuple(self.initial.shape)}, {tuple(self.transition.shape)}, "
                f"{tuple(self.emission.shape)}"
            )
        for name in ("initial", "transition", "emission"):
            p = getattr(self, name)
            if (p < 0).any() or not torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype)):
                raise ValueError(f"{name} must be non-negative with rows summing to 1")

    @property
    def num_tokens(self) -> int:
        """D, the number of data ids."""
        return self.emission.shape[1]

    def sample(self, n: int, length: int, generator: torch.Generator) -> Tensor:
        """n sequences (n, L) int64 drawn from the law with `generator`."""
        h = torch.multinomial(self.initial.expand(n, -1), 1, generator=generator)[:, 0]
        out = torch.empty(n, length, dtype=torch.int64)
        for pos in range(length):
            if pos > 0:
                h = torch.multinomial(self.transition[h], 1, generator=generator)[:, 0]
            out[:, pos] = torch.multinomial(self.emission[h], 1, generator=generator)[:, 0]
        return out

    @torch.no_grad()
    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) (B,) float64 of sequences x (B, L) by the log-space forward algorithm:
            log a_1 = log π + log E[:, x_1],
            log a_{l+1} = logsumexp_h(log a_l + log A) + log E[:, x_{l+1}],
            log p(x) = logsumexp log a_L.
        Ids outside 0..D−1 (e.g. a mask left in a sample) raise ValueError."""
        x = x.cpu().long()
        if x.ndim != 2 or x.min() < 0 or x.max() >= self.num_tokens:
            raise ValueError(f"x must be (B, L) ids in 0..{self.num_tokens - 1}")
        log_a_mat, log_e = self.transition.log(), self.emission.log().T  # (H, H), (D, H)
        log_alpha = self.initial.log() + log_e[x[:, 0]]  # (B, H)
        for pos in range(1, x.shape[1]):
            log_alpha = torch.logsumexp(log_alpha.unsqueeze(-1) + log_a_mat, dim=1)
            log_alpha = log_alpha + log_e[x[:, pos]]
        return torch.logsumexp(log_alpha, dim=-1)

    def entropy(
        self, length: int, n: int, generator: torch.Generator, batch: int = 4096
    ) -> Estimate:
        """H(X_{1:L}) / L = E_p[−log p(x)] / L by Monte Carlo over n fresh sequences, ± SE."""
        nll = torch.cat(
            [
                -self.log_prob(self.sample(min(batch, n - i), length, generator))
                for i in range(0, n, batch)
            ]
        )
        per_token = nll / length
        return Estimate(float(per_token.mean()), float(per_token.std() / math.sqrt(n)), n)

    def to_dict(self) -> dict:
        """JSON-able {initial, transition, emission} lists; `from_dict` rebuilds the law."""
        return {name: getattr(self, name).tolist() for name in _PARTS}

    @classmethod
    def from_dict(cls, data: dict) -> HiddenMarkovLaw:
        return cls(*(torch.tensor(data[name], dtype=torch.float64) for name in _PARTS))


def topic_hmm(
    num_tokens: int = 32,
    topics: int = 4,
    local_states: int = 8,
    transition_concentration: float = 0.3,
    emission_concentration: float = 0.1,
    seed: int = 0,
) -> HiddenMarkovLaw:
    """The module docstring's topic HMM: H = topics × local_states hidden states (topic-major),
    a uniform topic and local start, per-topic transitions ~ Dirichlet(transition_concentration)
    and emissions ~ Dirichlet(emission_concentration) over D = num_tokens, drawn with `seed`."""
    if min(num_tokens, topics, local_states) < 1:
        raise ValueError(f"need positive sizes, got D={num_tokens}, C={topics}, S={local_states}")
    gen = torch.Generator().manual_seed(seed)

    def dirichlet(rows: int, cols: int, conc: float) -> Tensor:
        g = torch._standard_gamma(torch.full((rows, cols), conc, dtype=torch.float64), gen)
        g = g.clamp_min(1e-30)  # a zero would make log p(x) = −inf for a legal sequence
        return g / g.sum(-1, keepdim=True)

    h = topics * local_states
    transition = torch.zeros(h, h, dtype=torch.float64)
    for c in range(topics):
        block = slice(c * local_states, (c + 1) * local_states)
        transition[block, block] = dirichlet(local_states, local_states, transition_concentration)
    initial = torch.full((h,), 1.0 / h, dtype=torch.float64)
    return HiddenMarkovLaw(initial, transition, dirichlet(h, num_tokens, emission_concentration))


def write_dataset(
    law: HiddenMarkovLaw, out_dir: str | Path, seq_len: int, rows: dict[str, int], seed: int
) -> Manifest:
    """Draw `rows[split]` sequences per split (in the dict's order, one generator seeded `seed`)
    and write them as a prepared directory (module docstring). FileExistsError if it exists."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another directory")
    gen = torch.Generator().manual_seed(seed)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        splits = {}
        for name, n in rows.items():
            tokens = law.sample(n, seq_len, gen).numpy().astype(np.uint16)
            (tmp / f"{name}.bin").write_bytes(tokens.tobytes())
            splits[name] = SplitInfo(
                file=f"{name}.bin", rows=n, tokens=n * seq_len, documents=n,
                sha256=sha256_file(tmp / f"{name}.bin"),
            )  # fmt: skip
        d = law.num_tokens
        manifest = Manifest(
            tokenizer={"kind": "hmm", "law": law.to_dict()}, vocab_size=d + 1, mask_id=d,
            pad_id=None, bos_id=None, eos_id=None, seq_len=seq_len, mode="wrap",
            dtype="uint16", splits=splits, sources=["hmm"], seed=seed,
            library_version=_library_version(),
        )  # fmt: skip
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def load_law(data_dir: str | Path) -> HiddenMarkovLaw:
    """The law a directory written by `write_dataset` was drawn from."""
    spec = load_manifest(data_dir).tokenizer
    if spec.get("kind") != "hmm":
        raise ValueError(f"{data_dir} was not written by xdlm.data.synthetic (tokenizer {spec})")
    return HiddenMarkovLaw.from_dict(spec["law"])
