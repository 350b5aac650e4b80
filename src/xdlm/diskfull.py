"""A failed file write, recognised in each form it takes, for one-line error messages.

A full disk reaches us as an `OSError` (ENOSPC, EDQUOT) from Python's own writes, as a
`SafetensorError` "... No space left on device (os error 28)" from safetensors, as torch's
`RuntimeError` "[enforce fail at inline_container.cc] unexpected pos" / "file write failed" from
its zip writer, or as a plain `Exception` from the Rust `tokenizers` library; only the first
carries an errno. Used by checkpoint saves (`xdlm.train.failures`) and `xdlm prepare`.
"""

from __future__ import annotations

import errno

from safetensors import SafetensorError

_DISK_FULL_TEXT = ("no space left", "storagefull", "os error 28", "unexpected pos",
                   "file write failed", "disk quota")  # fmt: skip
_TORCH_WRITER_TEXT = ("inline_container", "pytorchstreamwriter", "file write failed")


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` is a failed file write (not a bug in the caller): an OSError, a
    SafetensorError, a RuntimeError from torch's checkpoint writer, or a full disk."""
    if isinstance(err, (OSError, SafetensorError)) or is_disk_full(err):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in _TORCH_WRITER_TEXT)


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` says the file system ran out of space (or quota)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, Exception) and any(m in str(err).lower() for m in _DISK_FULL_TEXT)


def describe(err: BaseException) -> str:
    """ "no space left on device (TYPE: first line)" for a full disk, else the first line."""
    first = str(getattr(err, "strerror", None) or err).strip().splitlines()
    first = first[0][:200] if first else type(err).__name__
    if is_disk_full(err):
        return f"no space left on device ({type(err).__name__}: {first})"
    return first


def errno_of(err: BaseException) -> int:
    """The errno for an OSError re-raising `err`: ENOSPC for a full disk, else its own/EIO."""
    return errno.ENOSPC if is_disk_full(err) else getattr(err, "errno", None) or errno.EIO
