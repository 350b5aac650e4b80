"""Images as token sequences: quantised pixels, pixel patches or VQ codes -> labelled shards.

Three kinds, one shard format (the text format of `xdlm.data.prepare`, plus labels):

  - pixels: a `.npz` with `images` uint8 (N, H0, W0) in 0..255 and `labels` int (N,). Images are
    resized to `size`×`size` by area averaging, then quantised to `levels` grey levels,
    token = ⌊pixel · levels / 256⌋ in [0, levels); raster order, L = size².
  - patches: the same pixels, each non-overlapping `patch`×`patch` block one token: the base-g
    number of its g = `levels` grey levels, code = Σ_j q_j · g^j over the block's pixels j in
    raster order — a fixed, lossless codebook of g^(patch²) codes (a stand-in for a VQ tokenizer,
    the paper's image setting) and L = (size / patch)² tokens, patch² times fewer than pixels.
  - vq: a `.npz` with `codes` int (N, H, W) or (N, L) from any VQ tokenizer and `labels` int (N,);
    the codebook size is `codebook_size` (default: max code + 1). (N, L) codes are a 1×L image.
    `experiments/mnist/encode_vq.py` shows how to write such a file with a user's VQ model.

The prepared directory holds `manifest.json` (vocab_size V = levels + 1, mask_id m = levels, no
tokenizer, `image` = {"kind", "height", "width", "levels", "num_classes", "patch"}),
`{split}.bin` (N, L) and `{split}.labels.npy` int64 (N,). Train/valid are split by a fixed
permutation from `seed` (`xdlm.data.prepare.split_indices`); "valid" is the held-out split for
image metrics.

    from xdlm.data.images import prepare_images
    prepare_images("../shared/data/images/mnist10k.npz", "runs/data/mnist14", size=14, levels=8)
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xdlm.data.manifest import (
    MANIFEST_FILE,
    Manifest,
    SplitInfo,
    load_manifest,
    sha256_file,
    storage_dtype,
)
from xdlm.data.prepare import _library_version, _replace_dir, split_indices

__all__ = [
    "ImageInfo",
    "ImageTokens",
    "dequantize",
    "expand_patches",
    "from_patches",
    "image_info",
    "load_image_tokens",
    "prepare_images",
    "quantize",
    "resize",
    "to_patches",
    "tokens_to_images",
]

IMAGE_KINDS = ("pixels", "patches", "vq")


@dataclass(frozen=True)
class ImageInfo:
    """Shape and vocabulary of an image-token dataset: L = height · width tokens in [0, levels);
    the mask id is `levels`; classes are 0..num_classes-1. Patches: each token is a
    `patch`×`patch` block of grey levels g with levels = g^(patch²), so the image has
    (height · patch)×(width · patch) pixels."""

    kind: str
    height: int
    width: int
    levels: int
    num_classes: int
    patch: int = 1

    @property
    def grey_levels(self) -> int:
        """g: the grey levels of one pixel (pixels and patches kinds)."""
        return round(self.levels ** (1.0 / self.patch**2))


@dataclass(frozen=True)
class ImageTokens:
    """tokens int64 (N, H·W) in [0, info.levels), labels int64 (N,)."""

    tokens: np.ndarray
    labels: np.ndarray
    info: ImageInfo


def quantize(pixels: np.ndarray, levels: int) -> np.ndarray:
    """uint8 pixels (...) in 0..255 -> int64 tokens (...) = ⌊p · levels / 256⌋ in [0, levels)."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in [2, 256], got {levels}")
    return (np.asarray(pixels, dtype=np.int64) * levels) // 256


def dequantize(tokens: np.ndarray | torch.Tensor, levels: int) -> np.ndarray:
    """Tokens (...) in [0, levels) -> float32 grey (...) in [0, 1], the centre of each level.
    A token outside [0, levels) (e.g. a leftover mask) maps to 0.5."""
    tok = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    grey = (tok.astype(np.float32) + 0.5) / levels
    return np.where((tok >= 0) & (tok < levels), grey, 0.5).astype(np.float32)


def to_patches(tokens: np.ndarray, patch: int, levels: int) -> np.ndarray:
    """Grey-level tokens (N, H, W) in [0, g = levels) -> patch codes (N, H/p, W/p), p = `patch`:
    code = Σ_j q_j · g^j over the p×p block's pixels j in raster order."""
    n, height, width = tokens.shape
    if height % patch or width % patch:
        raise ValueError(f"image {height}x{width} is not a whole number of {patch}x{patch} patches")
    h, w = height // patch, width // patch
    blocks = tokens.reshape(n, h, patch, w, patch).transpose(0, 1, 3, 2, 4)
    return blocks.reshape(n, h, w, patch * patch) @ levels ** np.arange(patch**2, dtype=np.int64)


def from_patches(codes: np.ndarray, patch: int, levels: int) -> np.ndarray:
    """Inverse of `to_patches`: codes (N, h, w) -> grey-level tokens (N, h·p, w·p)."""
    n, h, w = codes.shape
    digits = codes[..., None] // levels ** np.arange(patch * patch, dtype=np.int64) % levels
    blocks = digits.reshape(n, h, w, patch, patch).transpose(0, 1, 3, 2, 4)
    return blocks.reshape(n, h * patch, w * patch)


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H0, W0) -> uint8 (N, size, size) by area averaging (identity at the same size)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if pixels.shape[1:] == (size, size):
        return np.asarray(pixels, dtype=np.uint8)
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32))[:, None]
    out = F.interpolate(x, size=(size, size), mode="area")[:, 0]
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def _load_npz(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass an .npz with {key!r} and 'labels'")
    with np.load(path) as data:
        missing = {key, "labels"} - set(data.files)
        if missing:
            raise ValueError(
                f"{path} lacks {sorted(missing)} (has {data.files}); see docs/images.md"
            )
        values, labels = data[key], data["labels"].astype(np.int64)
    if len(values) != len(labels) or labels.ndim != 1:
        raise ValueError(f"{path}: {key} {values.shape} and labels {labels.shape} must share N")
    if labels.min() < 0:
        raise ValueError(f"{path}: labels must be >= 0, got {labels.min()}")
    return values, labels


def load_image_tokens(
    path: str | Path,
    kind: str = "pixels",
    size: int = 14,
    levels: int = 8,
    codebook_size: int | None = None,
    patch: int = 2,
) -> ImageTokens:
    """Read an .npz (module docstring) into tokens (N, H·W) and labels (N,); `patch` applies to
    the patches kind only."""
    path = Path(path)
    if kind in ("pixels", "patches"):
        images, labels = _load_npz(path, "images")
        if images.ndim != 3:
            raise ValueError(f"{path}: images must be (N, H, W) grey, got {images.shape}")
        tokens = quantize(resize(images, size), levels)
        height = width = size
        if kind == "patches":
            if patch < 1 or levels ** (patch * patch) > 65535:
                raise ValueError(
                    f"patch {patch} with {levels} grey levels gives {levels}^{patch * patch} "
                    "codes; use patch >= 1 with at most 65,535 codes (fewer levels or patch 2)"
                )
            tokens = to_patches(tokens, patch, levels)
            height = width = size // patch
            levels = levels ** (patch * patch)
    elif kind == "vq":
        codes, labels = _load_npz(path, "codes")
        if codes.ndim not in (2, 3):
            raise ValueError(f"{path}: codes must be (N, H, W) or (N, L), got {codes.shape}")
        codes = codes.astype(np.int64)
        levels = int(codes.max()) + 1 if codebook_size is None else codebook_size
        if codes.min() < 0 or codes.max() >= levels:
            raise ValueError(
                f"{path}: codes span [{codes.min()}, {codes.max()}], outside "
                f"[0, codebook_size={levels}); pass the tokenizer's codebook size"
            )
        height, width = (1, codes.shape[1]) if codes.ndim == 2 else codes.shape[1:]
        tokens = codes
    else:
        raise ValueError(f"unknown image kind {kind!r}; choose one of {IMAGE_KINDS}")
    info = ImageInfo(kind, int(height), int(width), int(levels), int(labels.max()) + 1,
                     patch if kind == "patches" else 1)  # fmt: skip
    return ImageTokens(tokens.reshape(len(tokens), -1), labels, info)


def prepare_images(
    path: str | Path,
    out_dir: str | Path,
    kind: str = "pixels",
    size: int = 14,
    levels: int = 8,
    codebook_size: int | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    patch: int = 2,
) -> Manifest:
    """Write image tokens of `path` as a labelled prepared directory `out_dir` (module docstring).

    Args:
        kind: "pixels" (size, levels apply), "patches" (size, levels, patch apply) or "vq"
            (codebook_size applies).
        valid_fraction: share of images held out as "valid" (the metric's real set).
        seed: fixes the train/valid permutation and nothing else.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True or another out_dir")
    data = load_image_tokens(path, kind, size, levels, codebook_size, patch)
    parts = split_indices(len(data.tokens), valid_fraction, None, seed)
    vocab = data.info.levels + 1
    dtype = storage_dtype(vocab)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        splits = {}
        for name, idx in parts.items():
            (tmp / f"{name}.bin").write_bytes(data.tokens[idx].astype(dtype).tobytes())
            np.save(tmp / f"{name}.labels.npy", data.labels[idx])
            splits[name] = SplitInfo(
                file=f"{name}.bin", rows=len(idx), tokens=int(data.tokens[idx].size),
                documents=len(idx), sha256=sha256_file(tmp / f"{name}.bin"),
                labels_file=f"{name}.labels.npy",
            )  # fmt: skip
        manifest = Manifest(
            tokenizer={"kind": "image", "source": str(path)}, vocab_size=vocab,
            mask_id=data.info.levels, pad_id=None, bos_id=None, eos_id=None,
            seq_len=data.tokens.shape[1], mode="wrap", dtype=dtype, splits=splits,
            sources=[str(path)], seed=seed, library_version=_library_version(),
            image=vars(data.info).copy(),
        )  # fmt: skip
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def image_info(manifest_or_dir: Manifest | str | Path) -> ImageInfo:
    """The `ImageInfo` of an image-token dataset; ValueError for a text dataset."""
    manifest = manifest_or_dir
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest_or_dir)
    if manifest.image is None:
        raise ValueError(
            "this dataset holds text, not image tokens; prepare images with "
            "`xdlm images prepare` (xdlm.data.images.prepare_images)"
        )
    return ImageInfo(**manifest.image)


def expand_patches(grid: np.ndarray, patch: int) -> np.ndarray:
    """A per-token map (B, h, w) -> the per-pixel map (B, h·p, w·p), each value over its block."""
    return np.repeat(np.repeat(grid, patch, axis=1), patch, axis=2)


def tokens_to_images(tokens: np.ndarray | torch.Tensor, info: ImageInfo) -> np.ndarray:
    """Tokens (B, H·W) -> float32 images (B, H, W) in [0, 1] for display or a classifier.

    Pixels: the grey level centres. Patches: each code's p×p block of grey level centres (images
    (B, H·p, W·p); a code outside [0, levels), e.g. a leftover mask, is a grey 0.5 block). VQ:
    code / (levels − 1), a false-colour view of the code map (decode with the VQ model's decoder
    for real pixels)."""
    tok = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    tok = tok.reshape(len(tok), info.height, info.width).astype(np.int64)
    if info.kind == "pixels":
        return dequantize(tok, info.levels)
    if info.kind == "patches":
        g, valid = info.grey_levels, expand_patches((tok >= 0) & (tok < info.levels), info.patch)
        grey = dequantize(from_patches(np.clip(tok, 0, info.levels - 1), info.patch, g), g)
        return np.where(valid, grey, 0.5).astype(np.float32)
    return np.clip(tok / max(info.levels - 1, 1), 0.0, 1.0).astype(np.float32)
