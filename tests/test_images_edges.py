"""Edges of image tokens (issue 29): every limit at and one past it (grey levels, size, codes
per patch, the VQ codebook), every refusal word for word, what a prepared directory holds."""

import os
import shutil

import numpy as np
import pytest
import torch

from xdlm.data.images import (
    ImageInfo,
    dequantize,
    expand_patches,
    from_patches,
    image_info,
    load_image_tokens,
    prepare_images,
    quantize,
    resize,
    to_patches,
    tokens_to_images,
)
from xdlm.data.manifest import load_manifest


def _raises(error, message, call, *args, **kwargs):
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    assert str(info.value) == message


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_grey_levels_and_size_at_their_limits():
    assert quantize(np.array([0, 127, 128, 255], dtype=np.uint8), 2).tolist() == [0, 0, 1, 1]
    assert quantize(np.array([0, 255], dtype=np.uint8), 256).tolist() == [0, 255]
    for levels in (1, 257):
        _raises(ValueError, f"levels must be in [2, 256], got {levels}", quantize, [0], levels)
    grey = dequantize(torch.tensor([0, 1, 2, -1]), 2)
    assert grey.tolist() == [0.25, 0.75, 0.5, 0.5] and grey.dtype == np.float32
    square = np.array([[[0, 255], [255, 255]], [[0, 1], [0, 0]]], dtype=np.uint8)
    assert resize(square, 1).tolist() == [[[191]], [[0]]]  # area means 191.25 and 0.25, rounded
    assert resize(square, 1).dtype == np.uint8
    same = resize(square.astype(np.int64), 2)
    assert same.dtype == np.uint8 and np.array_equal(same, square)
    _raises(ValueError, "size must be >= 1, got 0", resize, square, 0)


def test_a_bad_npz_is_named_with_the_fix(tmp_path):
    missing = tmp_path / "none.npz"
    _raises(FileNotFoundError, f"{missing} does not exist; pass an .npz with 'images' and "
            "'labels'", load_image_tokens, missing)  # fmt: skip
    images = np.zeros((4, 2, 2), dtype=np.uint8)
    path = _npz(tmp_path / "a.npz", images=images)
    _raises(ValueError, f"{path} lacks ['labels'] (has ['images']); see docs/images.md",
            load_image_tokens, path)  # fmt: skip
    path = _npz(tmp_path / "b.npz", images=images, labels=np.zeros(3))
    _raises(ValueError, f"{path}: images (4, 2, 2) and labels (3,) must share N",
            load_image_tokens, path)  # fmt: skip
    path = _npz(tmp_path / "c.npz", images=images, labels=np.zeros((4, 1)))
    _raises(ValueError, f"{path}: images (4, 2, 2) and labels (4, 1) must share N",
            load_image_tokens, path)  # fmt: skip
    path = _npz(tmp_path / "d.npz", images=images, labels=np.array([0, 1, -1, 0]))
    _raises(ValueError, f"{path}: labels must be >= 0, got -1", load_image_tokens, path)
    path = _npz(tmp_path / "e.npz", images=np.zeros((4, 4)), labels=np.zeros(4))
    _raises(ValueError, f"{path}: images must be (N, H, W) grey, got (4, 4)",
            load_image_tokens, path)  # fmt: skip
    _raises(ValueError, "unknown image kind 'rgb'; choose one of ('pixels', 'patches', 'vq')",
            load_image_tokens, path, kind="rgb")  # fmt: skip


def test_codes_per_patch_at_most_65535(tmp_path):
    path = _npz(tmp_path / "x.npz", images=np.full((3, 4, 4), 255, dtype=np.uint8),
                labels=np.array([0, 2, 1]))  # fmt: skip
    ok = load_image_tokens(path, "patches", size=4, levels=15, patch=2)  # 15^4 = 50,625 codes
    assert ok.info == ImageInfo("patches", 2, 2, 15**4, 3, 2)
    assert ok.tokens.shape == (3, 4) and (ok.tokens == 15**4 - 1).all()  # all top grey
    for levels, patch in ((16, 2), (2, 4), (8, 0)):
        _raises(ValueError, f"patch {patch} with {levels} grey levels gives {levels}^"
                f"{patch * patch} codes; use patch >= 1 with at most 65,535 codes (fewer levels "
                "or patch 2)", load_image_tokens, path, "patches", size=4, levels=levels,
                patch=patch)  # fmt: skip
    pixels = load_image_tokens(path, "pixels", size=4, levels=16, patch=0)  # patch: patches only
    assert pixels.info == ImageInfo("pixels", 4, 4, 16, 3, 1) and pixels.tokens.shape == (3, 16)


def test_the_vq_codebook_holds_every_code(tmp_path):
    codes = np.array([[[0, 5]], [[2, 3]]])  # (N, H, W) = (2, 1, 2)
    path = _npz(tmp_path / "v.npz", codes=codes, labels=np.array([1, 0]))
    assert load_image_tokens(path, "vq").info == ImageInfo("vq", 1, 2, 6, 2)  # max code + 1
    assert load_image_tokens(path, "vq", codebook_size=6).info.levels == 6  # exactly enough
    span = f"{path}: codes span [0, 5], outside [0, codebook_size=5); pass the tokenizer's "
    _raises(ValueError, span + "codebook size", load_image_tokens, path, "vq", codebook_size=5)
    negative = _npz(tmp_path / "n.npz", codes=codes - 1, labels=np.array([1, 0]))
    with pytest.raises(ValueError, match=r"codes span \[-1, 4\], outside \[0, codebook_size=9\)"):
        load_image_tokens(negative, "vq", codebook_size=9)
    flat = _npz(tmp_path / "f.npz", codes=np.zeros((2, 1, 1, 2)), labels=np.array([1, 0]))
    _raises(ValueError, f"{flat}: codes must be (N, H, W) or (N, L), got (2, 1, 1, 2)",
            load_image_tokens, flat, "vq")  # fmt: skip


def test_a_prepared_image_directory_holds_labels_and_is_replaced_only_on_request(tmp_path):
    codes = np.arange(8 * 3).reshape(8, 3) * 3000  # codes up to 69,000: uint32 storage
    path = _npz(tmp_path / "v.npz", codes=codes, labels=np.arange(8) % 4)
    nested = tmp_path / "new" / "parent" / "d"  # parents are created
    assert prepare_images(path, nested, kind="vq").splits["train"].rows == 7
    shutil.rmtree(tmp_path / "new")
    out = tmp_path / "d"
    m = prepare_images(path, out, kind="vq", valid_fraction=0.25, seed=3)
    assert (m.vocab_size, m.mask_id, m.dtype, m.seq_len, m.mode) == (69_002, 69_001, "uint32",
                                                                     3, "wrap")  # fmt: skip
    assert (m.tokenizer, m.sources, m.seed) == ({"kind": "image", "source": str(path)},
                                                [str(path)], 3)  # fmt: skip
    assert m.image == {"kind": "vq", "height": 1, "width": 3, "levels": 69_001,
                       "num_classes": 4, "patch": 1}  # fmt: skip
    rows = {}
    for split in ("train", "valid"):
        info = m.splits[split]
        tokens = np.fromfile(out / info.file, dtype=np.uint32).reshape(info.rows, 3)
        labels = np.load(out / info.labels_file)
        assert labels.dtype == np.int64 and info.tokens == tokens.size == 3 * info.rows
        assert info.documents == info.rows and (labels == tokens[:, 0] // 9000 % 4).all()
        rows[split] = tokens[:, 0].tolist()
    assert (len(rows["train"]), len(rows["valid"])) == (6, 2)
    assert sorted(rows["train"] + rows["valid"]) == codes[:, 0].tolist()
    assert load_manifest(out) == m
    _raises(FileExistsError, f"{out} already exists; pass overwrite=True or another out_dir",
            prepare_images, path, out, kind="vq")  # fmt: skip
    again = prepare_images(path, out, kind="vq", valid_fraction=0.5, overwrite=True)
    assert again.splits["valid"].rows == 4 and load_manifest(out) == again
    assert sorted(os.listdir(tmp_path)) == ["d", "v.npz"]  # no temporary left


def test_image_views_of_each_kind(tmp_path):
    grid = np.array([[[1, 2], [3, 4]]])
    assert expand_patches(grid, 2).tolist() == [[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4],
                                                 [3, 3, 4, 4]]]  # fmt: skip
    vq = ImageInfo("vq", 1, 4, 5, 2)  # codes 0..4: code / 4, outside clipped into [0, 1]
    assert tokens_to_images(torch.tensor([[0, 2, 5, -1]]), vq).tolist() == [[[0, 0.5, 1, 0]]]
    patches = ImageInfo("patches", 1, 4, 2, 2, 1)  # g = 2 grey levels, one pixel a patch
    shown = tokens_to_images(np.array([[0, 1, 2, -1]]), patches)  # the mask 2 and -1: grey
    assert shown.tolist() == [[[0.25, 0.75, 0.5, 0.5]]]
    for info in (vq, patches, ImageInfo("pixels", 1, 4, 4, 2)):
        assert tokens_to_images(np.array([[0, 1, 1, 0]]), info).dtype == np.float32
    two = ImageInfo("vq", 1, 2, 2, 2)
    assert tokens_to_images(np.array([[0, 1]]), two).tolist() == [[[0.0, 1.0]]]
    one = ImageInfo("vq", 1, 2, 1, 2)  # a codebook of one code is shown black, never / 0
    assert tokens_to_images(np.array([[0, 0]]), one).tolist() == [[[0.0, 0.0]]]
    pixels = ImageInfo("pixels", 1, 2, 4, 2)
    assert tokens_to_images(np.array([[0, 3]]), pixels).tolist() == [[[0.125, 0.875]]]
    text = ("this dataset holds text, not image tokens; prepare images with `xdlm images "
            "prepare` (xdlm.data.images.prepare_images)")  # fmt: skip
    _raises(ValueError, text, image_info, _text_manifest(tmp_path))
    _raises(ValueError, text, image_info, tmp_path / "text")


def _text_manifest(tmp_path):
    from xdlm.data import prepare

    (tmp_path / "c.txt").write_text("a b c d e f g h\n\ni j k l m n o\n")
    return prepare(tmp_path / "c.txt", tmp_path / "text", tokenizer="char", seq_len=4,
                   valid_fraction=0.0)  # fmt: skip


def test_patches_of_one_and_three_pixels_are_codes_of_their_blocks():
    grey = np.random.default_rng(0).integers(0, 2, (2, 3, 6))
    assert np.array_equal(to_patches(grey, 1, 2), grey)  # one pixel per patch: its own level
    codes = to_patches(grey, 3, 2)
    assert codes.shape == (2, 1, 2) and codes.max() < 2**9
    assert codes[1, 0, 1] == sum(int(q) << b for b, q in enumerate(grey[1, :, 3:].ravel()))
    assert np.array_equal(from_patches(codes, 3, 2), grey)


def test_the_defaults_are_14_pixels_8_levels_and_patch_2(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (10, 28, 28)).astype(np.uint8)
    path = _npz(tmp_path / "x.npz", images=images, labels=np.arange(10) % 2)
    assert load_image_tokens(path).info == ImageInfo("pixels", 14, 14, 8, 2)
    assert load_image_tokens(path, "patches").info == ImageInfo("patches", 7, 7, 8**4, 2, 2)
    assert prepare_images(path, tmp_path / "d").image == vars(ImageInfo("pixels", 14, 14, 8, 2))
    patches = prepare_images(path, tmp_path / "p", kind="patches", levels=2).image
    assert patches == vars(ImageInfo("patches", 7, 7, 16, 2, 2))
    ones = load_image_tokens(path, "patches", levels=4, patch=1)  # patch 1 is allowed
    assert ones.info == ImageInfo("patches", 14, 14, 4, 2, 1)
    assert np.array_equal(ones.tokens, load_image_tokens(path, levels=4).tokens)


def test_a_full_disk_leaves_no_temporary_directory(tmp_path, small_fs):
    from run_fixtures import fill_disk

    codes = np.arange(4000 * 16).reshape(4000, 16) % 70_000  # ~256 KB of uint32 rows
    path = _npz(tmp_path / "v.npz", codes=codes, labels=np.zeros(4000, dtype=np.int64))
    fill_disk(small_fs, 64 * 1024)
    with pytest.raises(OSError, match="No space left on device"):
        prepare_images(path, small_fs / "d", kind="vq")
    assert sorted(os.listdir(small_fs)) == ["filler"]
