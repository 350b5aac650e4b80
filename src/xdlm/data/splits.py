"""The train/valid split of `prepare` and `xdlm images prepare`: by document (or image), from a
fixed permutation drawn from `seed`, so the same corpus and seed always give the same split."""

from __future__ import annotations

import numpy as np


def split_indices(
    n_docs: int, valid_fraction: float, valid_docs: int | None, seed: int
) -> dict[str, np.ndarray]:
    """Assign document indices to "train"/"valid" with a fixed permutation from `seed`.

    Returns sorted int64 index arrays (document order is kept inside a split); "valid" is absent
    when it would hold no document.
    """
    n_valid = valid_docs if valid_docs is not None else int(round(valid_fraction * n_docs))
    if valid_docs is None and valid_fraction > 0:
        n_valid = max(n_valid, 1)
    if n_valid >= n_docs:
        raise ValueError(
            f"the corpus has {n_docs} documents, too few to hold out {n_valid} for validation "
            "and keep some for training; add documents or lower valid_fraction/valid_docs"
        )
    perm = np.random.default_rng(seed).permutation(n_docs)
    parts = {"train": np.sort(perm[n_valid:])}
    if n_valid > 0:
        parts["valid"] = np.sort(perm[:n_valid])
    return parts


def valid_mask(n_docs: int, valid_fraction: float, valid_docs: int | None, seed: int) -> np.ndarray:
    """(n_docs,) bool: True for the documents `split_indices` puts in "valid"."""
    is_valid = np.zeros(n_docs, dtype=bool)
    parts = split_indices(n_docs, valid_fraction, valid_docs, seed)
    if "valid" in parts:
        is_valid[parts["valid"]] = True
    return is_valid
