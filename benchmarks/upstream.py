"""The authors' code, loaded at run time from fetched git mirrors (None when absent).

    gen = load_generate()    # MzeroMiko/LLaDA-XDLM generate.py
    gen.generate_xdm(AuthorsModel(fake), prompt, steps=32, gen_length=256, ..., k1=0.1)
    xdlm = load_xdlm_step()  # MzeroMiko/XDLM: XDMHelper (xdm_utils.py), sample_categorical,
                             # and the MDLM model's `_ancestral_update_remdm` (algo.py)

Nothing of the authors' code is copied into this repository: the files are read from the
mirrors' HEAD with `git show` and executed. Its top-level `from transformers import
AutoTokenizer, AutoModel` is only used by its `main()`; when transformers is not installed a
stand-in module with those two names is provided for the import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

MIRROR = Path("/work/.mirror/MzeroMiko+LLaDA-XDLM/repo")
XDLM_MIRROR = Path("/work/.mirror/MzeroMiko+XDLM/repo")


def _show(git_dir: str | Path, path: str) -> str | None:
    try:
        return subprocess.run(
            ["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def load_xdlm_step(git_dir: str | Path = XDLM_MIRROR) -> SimpleNamespace | None:
    """The XDLM repository's ancestral step: `XDMHelper` (xdm_utils.py, imports torch only),
    algo.py's `sample_categorical` and its MDLM model's `_ancestral_update_remdm` method as a
    plain function of (self, x, t, dt) (only those definitions are executed: algo.py's imports
    need the authors' Lightning training stack)."""
    helper, algo = _show(git_dir, "xdm_utils.py"), _show(git_dir, "algo.py")
    if helper is None or algo is None:
        return None
    scope: dict = {"torch": torch}
    exec(compile(helper, f"{git_dir}:HEAD:xdm_utils.py", "exec"), scope)  # noqa: S102
    tree = ast.parse(algo)
    body = [n for n in tree.body if getattr(n, "name", None) == "sample_categorical"]
    methods = [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body]
    body += [m for m in methods if getattr(m, "name", None) == "_ancestral_update_remdm"][:1]
    exec(compile(ast.Module(body=body, type_ignores=[]), "algo.py", "exec"), scope)  # noqa: S102
    return SimpleNamespace(
        XDMHelper=scope["XDMHelper"], sample_categorical=scope["sample_categorical"],
        remdm_update=scope.get("_ancestral_update_remdm"),
    )  # fmt: skip


def load_generate(git_dir: str | Path = MIRROR) -> types.ModuleType | None:
    """The module of the authors' `generate.py` at the mirror's HEAD, or None when absent."""
    source = _show(git_dir, "generate.py")
    if source is None:
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
