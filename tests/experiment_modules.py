"""Load an experiment's run.py and report.py (experiments/<name>/) as modules for tests."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def experiment_modules(name: str, parts: tuple[str, ...] = ("run", "report")) -> Iterator[dict]:
    """{part: module} of experiments/<name>/<part>.py (run.py and report.py unless `parts` says
    otherwise), with that folder on sys.path while the generator is open (use as a pytest
    fixture body: `yield from`)."""
    folder = EXPERIMENTS / name
    sys.path.insert(0, str(folder))
    modules = {}
    for part in parts:
        spec = importlib.util.spec_from_file_location(f"{name}_{part}", folder / f"{part}.py")
        modules[part] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[part])
    yield modules
    sys.path.remove(str(folder))


def grid_configs(run, settings: dict, budget: str) -> list:
    """The configs of every (k, seed) model of `settings`' grid, asserting that they differ only
    in kernel.k (with use_mask = k != 1) and train.seed, in the grid's order."""
    pairs = run.models(settings)
    cfgs = [run.model_config(settings, budget, k, s, Path("d")) for k, s in pairs]
    strip = [
        dataclasses.replace(c, kernel=None, train=dataclasses.replace(c.train, seed=0)).to_dict()
        for c in cfgs
    ]
    assert all(s == strip[0] for s in strip)
    assert [(c.kernel.k, c.train.seed) for c in cfgs] == pairs
    assert [c.kernel.use_mask for c in cfgs] == [k != 1.0 for k, _ in pairs]
    return cfgs
