"""Exponential moving average of a module's parameters, kept in float32.

After the n-th update (n = 1, 2, ...), with d_n the decay used at that update,

    θ̄ ← d_n · θ̄ + (1 − d_n) · θ,    d_n = min(decay, (1 + n) / (10 + n)) with warmup, else decay.

Warmup lets the average forget the random initialisation quickly early in training. Only
parameters are averaged (buffers are not); tied parameters appear once, by their first name.

    ema = EMA(model, decay=0.9999)
    ...  # after each optimizer step:
    ema.update(model)
    with ema.swapped(model):   # evaluate / sample with the averaged weights
        evaluate(model)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """Float32 shadow copy of `model`'s parameters, updated by `update(model)`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters()
        }

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise ValueError(
                f"model does not match the EMA's parameters (missing {missing}, unexpected "
                f"{extra}); build the EMA from the same architecture"
            )
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ̄ ← d·θ̄ + (1 − d)·θ for every parameter, with d = `current_decay()`."""
        weight = 1.0 - self.current_decay()
        for name, p in self._params(model).items():
            self.shadow[name].lerp_(p.detach().to(self.shadow[name]), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s parameters with the averages (cast to each parameter's dtype)."""
        for name, p in self._params(model).items():
            p.copy_(self.shadow[name])

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averages into `model`; the live weights come back on exit."""
        params = self._params(model)
        backup = {name: p.detach().clone() for name, p in params.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict:
        """Plain dict: decay, warmup, num_updates and the shadow tensors by parameter name."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {name: s.clone() for name, s in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; the parameter names and shapes must match this EMA's."""
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            raise ValueError(
                f"EMA state has parameters {sorted(shadow)} but this EMA has "
                f"{sorted(self.shadow)}; load it into an EMA of the same architecture"
            )
        for name, s in shadow.items():
            if s.shape != self.shadow[name].shape:  # copy_ would broadcast a (1,) tensor
                raise ValueError(
                    f"EMA state tensor {name} has shape {tuple(s.shape)}, this EMA's is "
                    f"{tuple(self.shadow[name].shape)}; load it into an EMA of the same model"
                )
            self.shadow[name].copy_(s)
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow tensors (kept float32) to `device`; returns self."""
        self.shadow = {name: s.to(device) for name, s in self.shadow.items()}
        return self
