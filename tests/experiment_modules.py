"""Load an experiment's run.py and report.py (experiments/<name>/) as modules for tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def experiment_modules(name: str) -> Iterator[dict]:
    """{"run": module, "report": module} of experiments/<name>, with that folder on sys.path
    while the generator is open (use as a pytest fixture body: `yield from`)."""
    folder = EXPERIMENTS / name
    sys.path.insert(0, str(folder))
    modules = {}
    for part in ("run", "report"):
        spec = importlib.util.spec_from_file_location(f"{name}_{part}", folder / f"{part}.py")
        modules[part] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[part])
    yield modules
    sys.path.remove(str(folder))
