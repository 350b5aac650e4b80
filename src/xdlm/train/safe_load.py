"""Loading checkpoint files without running code from them.

A checkpoint is data, but pickle is a program: `torch.load(weights_only=False)` (or
`pickle.load`) on a `state.pt` someone else wrote can run any command (a `__reduce__` payload).
Everything xdlm reads back from a checkpoint therefore goes through one of two doors:

- `load_state_file(path)`: `torch.load(weights_only=True)`, PyTorch's restricted unpickler
  (tensors, numbers, strings, lists, dicts, tuples only). A `state.pt` written by xdlm always
  passes it; anything else is refused with `UnsafeCheckpointError`.
- `load_dcp(state, path)`: `torch.distributed.checkpoint.load` with its two pickle readers
  replaced: the `.metadata` file is unpickled with an allowlist of DCP's own metadata classes,
  and non-tensor entries ("bytes" items) with `weights_only=True`.

Weights themselves are safetensors files, which hold no code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds objects that only a code-running unpickler could rebuild."""


def _refusal(path: Path, err: Exception) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {path}: it holds objects other than tensors and plain containers "
        f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). xdlm never writes such a "
        "file; it may be corrupt or crafted to run code. Do not load it; use a checkpoint you "
        "or xdlm wrote"
    )


def load_state_file(path: str | Path) -> dict:
    """`torch.load(path, weights_only=True)`; `UnsafeCheckpointError` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the checkpoint is incomplete")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    except (EOFError, RuntimeError) as err:  # emptied, truncated, not a torch.save archive
        raise ValueError(
            f"{path} is truncated or corrupt ({(str(err) or 'empty').splitlines()[0][:200]}); "
            "use another checkpoint of the run (checkpoints/step_N)"
        ) from None
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"{path} holds a {type(state).__name__}, not a dict")
    return state


# The globals a DCP `.metadata` pickle may name: DCP's metadata dataclasses and enums, torch
# sizes / dtypes / layouts / memory formats, and the path it was saved under. Nothing else: a
# class whose constructor touches the file system (e.g. FileSystemWriter) must not be callable.
_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *(
        (_METADATA, name)
        for name in (
            "Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata",
            "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _read_metadata(meta_path: Path):
    """Unpickle a DCP metadata file with the allowlist above."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(meta_path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, AttributeError, TypeError, EOFError) as err:
        raise _refusal(meta_path, err) from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{meta_path} is not DCP metadata; it is not a checkpoint")
    return metadata


def load_dcp(state: dict, path: str | Path) -> None:
    """`torch.distributed.checkpoint.load(state, checkpoint_id=path)` without unrestricted
    unpickling (module docstring); fills `state` in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = Path(path)
    if (path / ".metadata").is_file():  # checked here too, for an error DCP does not wrap
        _read_metadata(path / ".metadata")

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = _read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                raise _refusal(path / read_item.dest_index.fqn, err) from None
            # as DefaultLoadPlanner.load_bytes places it (Planner() flattens the state dict)
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)

    try:
        dcp.load(state, storage_reader=Reader(path), planner=Planner())
    except CheckpointException as err:  # DCP wraps what a reader raises (per rank)
        refused = [e for e, _ in err.failures.values() if isinstance(e, UnsafeCheckpointError)]
        if refused:
            raise refused[0] from None
        raise
