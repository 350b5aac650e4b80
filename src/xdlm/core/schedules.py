"""Noise schedules α_t: the probability that a token is kept at time t ∈ [0, 1].

Convention: t = 0 is clean (α_0 ≈ 1), t = 1 is the noisiest (α_1 ≈ 0), α'_t = dα/dt ≤ 0.
Every schedule gives `alpha(t)`, `dalpha(t)` and its inverse `t_of_alpha(α)` (so sampling
grids can be made uniform in α). Inputs are tensors of any shape; outputs have the same shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Schedule(Protocol):
    """α_t with its derivative and inverse; all three act elementwise on tensors."""

    def alpha(self, t: Tensor) -> Tensor: ...

    def dalpha(self, t: Tensor) -> Tensor: ...

    def t_of_alpha(self, alpha: Tensor) -> Tensor: ...


def _check_eps(eps: float) -> None:
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"schedule eps must be in [0, 1), got {eps}")


@dataclass(frozen=True)
class LogLinear:
    """The paper's default: α_t = 1 − (1 − ε)·t, so α'_t = −(1 − ε) and α_1 = ε.

    ("Log-linear" in σ: α_t = exp(−σ_t) with σ_t = −log(1 − (1 − ε)t).)
    """

    eps: float = 1e-3

    def __post_init__(self) -> None:
        _check_eps(self.eps)

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def dalpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1.0 - self.eps))

    def t_of_alpha(self, alpha: Tensor) -> Tensor:
        return (1.0 - alpha) / (1.0 - self.eps)


@dataclass(frozen=True)
class Linear:
    """α_t = 1 − t (the ε = 0 limit of the log-linear schedule; α_1 = 0)."""

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def dalpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)

    def t_of_alpha(self, alpha: Tensor) -> Tensor:
        return 1.0 - alpha


@dataclass(frozen=True)
class Cosine:
    """α_t = ε + (1 − ε)·cos(πt/2); α'_t = −(1 − ε)(π/2)·sin(πt/2)."""

    eps: float = 1e-3

    def __post_init__(self) -> None:
        _check_eps(self.eps)

    def alpha(self, t: Tensor) -> Tensor:
        return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * t)

    def dalpha(self, t: Tensor) -> Tensor:
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def t_of_alpha(self, alpha: Tensor) -> Tensor:
        c = ((alpha - self.eps) / (1.0 - self.eps)).clamp(0.0, 1.0)
        return torch.arccos(c) * (2.0 / math.pi)


@dataclass(frozen=True)
class Polynomial:
    """α_t = 1 − (1 − ε)·t^w (w > 0; w = 1 is log-linear); α'_t = −(1 − ε)·w·t^(w−1)."""

    power: float = 2.0
    eps: float = 1e-3

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        if self.power <= 0:
            raise ValueError(f"polynomial schedule power must be > 0, got {self.power}")

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.eps) * t.pow(self.power)

    def dalpha(self, t: Tensor) -> Tensor:
        return -(1.0 - self.eps) * self.power * t.pow(self.power - 1.0)

    def t_of_alpha(self, alpha: Tensor) -> Tensor:
        return ((1.0 - alpha) / (1.0 - self.eps)).clamp_min(0.0).pow(1.0 / self.power)


SCHEDULES = {"loglinear": LogLinear, "linear": Linear, "cosine": Cosine, "polynomial": Polynomial}


def make_schedule(name: str, **kwargs: float) -> Schedule:
    """Build a schedule by name (`loglinear`, `linear`, `cosine`, `polynomial`)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)


def schedule_spec(schedule: Schedule) -> dict:
    """A JSON-able description that `make_schedule(**spec)` turns back into the schedule."""
    name = next(n for n, cls in SCHEDULES.items() if type(schedule) is cls)
    return {"name": name, **{f: getattr(schedule, f) for f in schedule.__dataclass_fields__}}
