"""Small public-domain corpora shipped inside the package (for the quickstart and tests)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EMBEDDED = ("austen",)


def embedded_corpus_path(name: str = "austen") -> Path:
    """Path to the gzip text of an embedded corpus (see `data/corpora/README.md`).

    "austen": Jane Austen, Pride and Prejudice, unedited; documents = paragraphs.
    """
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded corpus {name!r}; choose one of {EMBEDDED}")
    path = Path(str(resources.files("xdlm.data").joinpath("corpora", f"{name}.txt.gz")))
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded corpus {path} is missing from this install; reinstall xdlm "
            "(package data data/corpora/*.gz)"
        )
    return path
