"""Read the tensors of a PyTorch Lightning `.ckpt` without running any code from it.

A Lightning checkpoint is a pickle. Besides tensors and plain containers it holds metadata that
`torch.load(weights_only=True)` refuses: `hyper_parameters` of the official MDLM / UDLM / Duo /
XDLM code hold an omegaconf `DictConfig` and a transformers tokenizer object. We load with
`weights_only=True` all the same (torch's restricted unpickler: only tensor-rebuild functions
and plain containers are ever called), and map each extra global the file names to `Inert`, an
inert placeholder of ours, only when it belongs to a metadata library we expect there
(`METADATA_MODULES`, `METADATA_NAMES`). Nothing from those libraries is imported or called:
a placeholder only records the arguments it was given. Any other global (`os.system`,
`builtins.eval`, `subprocess.Popen`, a class of an unknown package, ...) makes `safe_load`
refuse the file with a `ValueError` naming it, before anything is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Libraries whose objects a Lightning checkpoint carries as metadata (hyper-parameters, the
# tokenizer, loop / callback / sampler state). Matched on the first dotted component.
METADATA_MODULES = frozenset(
    {
        "omegaconf",
        "hydra",
        "transformers",
        "tokenizers",
        "lightning",
        "lightning_fabric",
        "pytorch_lightning",
        "numpy",
        "typing",
        "pathlib",
    }
)
# Single harmless builtins / stdlib types that the metadata refers to (e.g. DictConfig stores
# `object_type=dict`).
METADATA_NAMES = frozenset(
    {
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "builtins.set",
        "builtins.int",
        "builtins.float",
        "builtins.str",
        "builtins.bool",
        "builtins.object",
        "collections.defaultdict",
        "collections.OrderedDict",
    }
)


class Inert:
    """Stands in for any metadata object of the checkpoint: records, never executes."""

    def __new__(cls, *args, **kwargs):
        # pickle's NEWOBJ calls only __new__ (then BUILD -> __setstate__); REDUCE calls the class
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs) -> None:
        """Everything was recorded by __new__."""

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return "Inert(...)"


def is_metadata_global(name: str) -> bool:
    """True for a global `module.qualname` we replace by `Inert` (module docstring)."""
    return name in METADATA_NAMES or name.split(".", 1)[0] in METADATA_MODULES


def safe_load(path: str | Path) -> dict:
    """The checkpoint's top-level dict with every tensor intact and metadata objects `Inert`.

    Raises FileNotFoundError when `path` is missing and ValueError for a file that names a
    global outside the metadata allow-list (possible code execution) or is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a zip / pickle: many exception types
        raise ValueError(
            f"{path} is not a zip-format PyTorch checkpoint ({err}); files written by "
            "torch.save since PyTorch 1.6 are (Lightning .ckpt included); legacy ones are not read"
        ) from err
    refused = sorted(n for n in names if not is_metadata_global(n))
    if refused:
        raise ValueError(
            f"refusing to load {path}: it references {refused}, which a model checkpoint never "
            "needs and which could run code when unpickled. Only tensors, plain containers and "
            "the metadata of Lightning / omegaconf / transformers are accepted."
        )
    with torch.serialization.safe_globals([(Inert, n) for n in names]):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # pickle errors come in many types
            raise ValueError(f"could not read {path} as a tensor checkpoint ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a checkpoint dict")
    return data


def plain(obj):
    """Metadata read back as plain Python: an omegaconf container or node that loaded as `Inert`
    becomes the dict / list / value it held (its recorded `_content` / `_val` state); other
    `Inert` objects become None. Reading only: nothing of the original classes runs."""
    if isinstance(obj, Inert):
        state = obj.state if isinstance(obj.state, dict) else {}
        for key in ("_content", "_val"):
            if key in state:
                return plain(state[key])
        return None
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
