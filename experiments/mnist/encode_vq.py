"""Encode images with YOUR VQ tokenizer into the .npz that `xdlm images prepare --kind vq` reads.

    python experiments/mnist/encode_vq.py --images images.npz --encoder my_vq.py:encode \\
        --out codes.npz
    xdlm images prepare --kind vq --npz codes.npz --codebook-size 1024 --out runs/data/my-vq

`--images` holds `images` (N, H, W[, C]) uint8 and `labels` (N,). `--encoder FILE.py:FUNC` names a
function `FUNC(images: uint8 ndarray (n, H, W[, C])) -> int ndarray (n, h, w)` (or (n, L)) of
code ids in [0, codebook_size): e.g. a taming-transformers / MaskGIT VQGAN's `encode` + argmin.
xdlm itself depends on no VQ model; this script only batches the calls and writes
`codes` int32 (N, h, w) + `labels` int64 (N,).
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np


def load_encoder(spec: str):
    """'path/to/file.py:function' -> the function."""
    path, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--encoder expects FILE.py:FUNCTION, got {spec!r}")
    module_spec = importlib.util.spec_from_file_location("user_vq", path)
    if module_spec is None:
        raise FileNotFoundError(f"cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--encoder", required=True, help="FILE.py:FUNCTION")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    encode = load_encoder(args.encoder)
    with np.load(args.images) as data:
        images, labels = data["images"], data["labels"].astype(np.int64)
    codes = np.concatenate(
        [
            np.asarray(encode(images[i : i + args.batch_size]))
            for i in range(0, len(images), args.batch_size)
        ]
    )
    np.savez(args.out, codes=codes.astype(np.int32), labels=labels)
    print(f"wrote {args.out}: codes {codes.shape}, labels {labels.shape}")


if __name__ == "__main__":
    main()
