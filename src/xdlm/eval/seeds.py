"""Statistics over training seeds: t-intervals of a mean and of paired differences.

    t_interval([2.41, 2.43, 2.40])                       # mean ± t_{0.975, n−1}·s/√n
    paired_difference([2.45, 2.47, 2.44], [2.41, 2.43, 2.40])   # (k=0.1) − (k=0), paired by seed

With n seeds (the replication unit: initial weights, batch order and noise draws all change with
the seed), the 95 % interval of the mean is x̄ ± t_{0.975, n−1}·s/√n with the sample standard
deviation s (ddof = 1). A paired difference d_i = a_i − b_i uses the same seed i for both, so
the seed-shared part of the noise cancels; its interval is the t-interval of the d_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy import stats


@dataclass(frozen=True)
class Interval:
    """A mean over n values with its standard error and two-sided `level` t-interval [lo, hi]."""

    mean: float
    se: float
    lo: float
    hi: float
    n: int
    level: float

    def to_dict(self) -> dict:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.lo > 0.0 or self.hi < 0.0


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The t-interval of the mean of `values` (n ≥ 2; ValueError otherwise)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 values (seeds), got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * se
    return Interval(mean, se, mean - half, mean + half, n, level)


def paired_difference(
    values: Sequence[float], baseline: Sequence[float], level: float = 0.95
) -> Interval:
    """The t-interval of a_i − b_i, with a_i and b_i measured with the same seed i."""
    if len(values) != len(baseline):
        raise ValueError(
            f"paired values need the same seeds: got {len(values)} and {len(baseline)} values"
        )
    return t_interval([a - b for a, b in zip(values, baseline, strict=True)], level)
