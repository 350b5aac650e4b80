"""The authors' LLaDA-XDLM `generate.py`, loaded at run time from a fetched git mirror.

    gen = load_generate("/work/.mirror/MzeroMiko+LLaDA-XDLM/repo")   # None when absent
    gen.generate_xdm(AuthorsModel(fake), prompt, steps=32, gen_length=256, ..., k1=0.1)

Nothing of the authors' code is copied into this repository: the file is read from the mirror's
HEAD with `git show` and executed as a module. Its top-level `from transformers import
AutoTokenizer, AutoModel` is only used by its `main()`; when transformers is not installed a
stand-in module with those two names is provided for the import.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

MIRROR = Path("/work/.mirror/MzeroMiko+LLaDA-XDLM/repo")


def load_generate(git_dir: str | Path = MIRROR) -> types.ModuleType | None:
    """The module of the authors' `generate.py` at the mirror's HEAD, or None when absent."""
    try:
        source = subprocess.run(
            ["git", f"--git-dir={git_dir}", "show", "HEAD:generate.py"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    if "transformers" not in sys.modules:
        try:
            import transformers  # noqa: F401
        except ImportError:
            sys.modules["transformers"] = types.SimpleNamespace(AutoTokenizer=None, AutoModel=None)
    module = types.ModuleType("llada_xdlm_generate")
    module.__file__ = f"{git_dir}:HEAD:generate.py"
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102
    return module


class AuthorsModel:
    """Our Denoiser `f(z, t, attention_mask, cond) -> logits` in the HF form the authors' code
    calls: `model(x, attention_mask=...).logits`, with a `.device`."""

    def __init__(self, denoiser, device: str = "cpu"):
        self.denoiser, self.device = denoiser, torch.device(device)

    def __call__(self, x, attention_mask=None):
        return SimpleNamespace(logits=self.denoiser(x, None, attention_mask))
