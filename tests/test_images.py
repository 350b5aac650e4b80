"""Image tokens: pixel/VQ preparation, FID-style metric, class conditioning and guidance end to end.

Everything runs on synthetic 6x6 "digits" and a 1-layer DiT: seconds on 2 CPU cores.
"""

import json

import numpy as np
import pytest
import torch

from xdlm.config import load_config
from xdlm.data.images import (
    dequantize,
    from_patches,
    image_info,
    prepare_images,
    quantize,
    to_patches,
    tokens_to_images,
)
from xdlm.data.loader import ShardedLoader, TokenShards
from xdlm.eval.images import class_diversity, frechet_distance, sample_classes
from xdlm.runs import load_run
from xdlm.sampling import generate
from xdlm.train.loop import train


def _npz(path, n=40, size=6, classes=2):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    images = rng.integers(0, 256, (n, size, size)).astype(np.uint8)
    images[labels == 1, :, : size // 2] = 255  # class 1 is bright on the left
    np.savez(path, images=images, labels=labels.astype(np.uint8))
    return images, labels


def test_quantize_round_trip_and_range():
    pixels = np.arange(256, dtype=np.uint8)
    for levels in (2, 4, 8, 256):
        tok = quantize(pixels, levels)
        assert tok.min() == 0 and tok.max() == levels - 1
        back = (dequantize(tok, levels) * 256).astype(np.uint8)  # level centres -> same level
        assert np.array_equal(quantize(back, levels), tok)
    assert dequantize(np.array([4]), 4)[0] == 0.5  # a leftover mask id shows as mid grey


def test_prepare_pixels_labels_and_deterministic_split(tmp_path):
    images, labels = _npz(tmp_path / "x.npz")
    m = prepare_images(tmp_path / "x.npz", tmp_path / "d", size=6, levels=4, valid_fraction=0.25)
    again = prepare_images(
        tmp_path / "x.npz", tmp_path / "e", size=6, levels=4, valid_fraction=0.25
    )
    assert m.splits["valid"].sha256 == again.splits["valid"].sha256
    assert (m.vocab_size, m.mask_id, m.seq_len, m.bos_id) == (5, 4, 36, None)
    info = image_info(tmp_path / "d")
    assert (info.height, info.width, info.levels, info.num_classes) == (6, 6, 4, 2)
    assert m.splits["train"].rows + m.splits["valid"].rows == 40
    shards = TokenShards(tmp_path / "d", "train")
    rows = shards.rows(np.arange(len(shards)))
    pix = {tuple(quantize(img, 4).ravel()): lab for img, lab in zip(images, labels, strict=True)}
    for tok, lab in zip(rows.tokens.numpy(), rows.labels.numpy(), strict=True):
        assert pix[tuple(tok)] == lab  # every row keeps its own label
    batch = ShardedLoader(shards, 4, seed=0).next_batch()
    assert batch.labels.shape == (4,) and batch.labels.dtype == torch.int64
    assert tokens_to_images(rows.tokens[:3], info).shape == (3, 6, 6)


def test_prepare_vq_codes_both_layouts(tmp_path):
    codes = np.random.default_rng(1).integers(0, 16, (12, 3, 4))
    np.savez(tmp_path / "v.npz", codes=codes, labels=np.arange(12) % 3)
    m = prepare_images(tmp_path / "v.npz", tmp_path / "v", kind="vq", codebook_size=16)
    assert (m.vocab_size, m.mask_id, m.seq_len, m.image["height"]) == (17, 16, 12, 3)
    np.savez(tmp_path / "f.npz", codes=codes.reshape(12, -1), labels=np.arange(12) % 3)
    m = prepare_images(tmp_path / "f.npz", tmp_path / "f", kind="vq", codebook_size=16)
    assert (m.image["height"], m.image["width"]) == (1, 12)
    with pytest.raises(ValueError, match="codebook_size"):
        prepare_images(tmp_path / "v.npz", tmp_path / "g", kind="vq", codebook_size=8)


def test_patch_codes_match_a_loop_reference_and_invert():
    grey = np.random.default_rng(2).integers(0, 3, (5, 6, 4))
    codes = to_patches(grey, 2, 3)
    assert codes.shape == (5, 3, 2) and codes.max() < 3**4
    for n, i, j in np.ndindex(*codes.shape):
        block = grey[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel()  # raster order in the block
        assert codes[n, i, j] == sum(int(q) * 3**b for b, q in enumerate(block))
    assert np.array_equal(from_patches(codes, 2, 3), grey)
    with pytest.raises(ValueError, match="3x3 patches"):
        to_patches(grey, 3, 3)


def test_prepare_patches_is_the_pixel_images_with_fewer_tokens(tmp_path, capsys):
    from xdlm.cli import main
    from xdlm.commands.images import save_strip

    _npz(tmp_path / "x.npz")
    pix = prepare_images(tmp_path / "x.npz", tmp_path / "p", size=6, levels=4)
    argv = ["images", "prepare", "--npz", str(tmp_path / "x.npz"), "--out", str(tmp_path / "q")]
    assert main([*argv, "--kind", "patches", "--size", "6", "--levels", "4", "--patch", "2"]) == 0
    assert "'patch': 2" in capsys.readouterr().out
    info = image_info(tmp_path / "q")
    assert (info.kind, info.height, info.width, info.levels, info.patch) == (
        "patches",
        3,
        3,
        256,
        2,
    )
    assert (info.grey_levels, pix.seq_len, image_info(tmp_path / "p").patch) == (4, 36, 1)
    rows = {d: TokenShards(tmp_path / d, "train").rows(np.arange(10)) for d in "pq"}
    assert rows["q"].tokens.shape == (10, 9) and torch.equal(rows["p"].labels, rows["q"].labels)
    images = tokens_to_images(rows["q"].tokens, info)
    assert np.array_equal(images, tokens_to_images(rows["p"].tokens, image_info(tmp_path / "p")))
    masked = rows["q"].tokens.clone()
    masked[0, 4] = info.levels  # the mask id: the centre patch shows as a grey block
    grey = tokens_to_images(masked, info)[0]
    assert (grey[2:4, 2:4] == 0.5).all() and np.array_equal(grey[:2], images[0, :2])
    save_strip(torch.stack([masked, rows["q"].tokens]), info, tmp_path / "s.png")
    assert _red_pixels(tmp_path / "s.png") > 0  # the masked patch is drawn in the mask colour
    with pytest.raises(ValueError, match="65,535 codes"):
        prepare_images(tmp_path / "x.npz", tmp_path / "r", kind="patches", size=6, patch=3)


def test_frechet_distance_zero_for_same_set_large_for_noise():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 8))
    assert frechet_distance(real, real) < 1e-8
    assert frechet_distance(real, rng.normal(size=(500, 8))) < 0.5  # same law, sampling noise
    assert frechet_distance(real, 3 + 2 * rng.normal(size=(500, 8))) > 50
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = real, rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(
        ca + cb - 2 * scipy_linalg.sqrtm(ca @ cb).real
    )
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_class_diversity_is_within_class_distance():
    feats = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 10.0], [10.0, 10.0]])
    assert class_diversity(feats, np.array([0, 0, 1, 1])) == pytest.approx(2.5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-layer class-conditional DiT trained 3 steps on synthetic 6x6 images."""
    tmp = tmp_path_factory.mktemp("img")
    _npz(tmp / "x.npz")
    prepare_images(tmp / "x.npz", tmp / "data", size=6, levels=4, valid_fraction=0.25)
    cfg = load_config(None, [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.num_classes=2",
        "model.time_conditioning=true", f"data.path={tmp / 'data'}", "data.seq_len=36",
        "data.batch_size=8", "train.steps=3", "train.warmup_steps=1", "train.eval_batches=1",
        "train.cond_drop=0.5",
    ])  # fmt: skip
    train(cfg, tmp / "run")
    return tmp


def test_conditioning_changes_outputs_and_guidance_zero_is_unguided(tiny_run):
    loaded = load_run(tiny_run / "run")
    z = torch.zeros(2, 36, dtype=torch.long)
    t = torch.full((2,), 0.5)
    a = loaded.model(z, t, None, torch.tensor([0, 0]))
    b = loaded.model(z, t, None, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)  # the label reaches the logits

    def run(**kw):
        gen = torch.Generator().manual_seed(3)
        return generate(loaded.model, loaded.kernel, loaded.schedule, batch_size=4, seq_len=36,
                        steps=4, generator=gen, cache=False, **kw)  # fmt: skip

    labels = torch.tensor([0, 1, 0, 1])
    plain = run(class_labels=labels)
    assert torch.equal(run(class_labels=labels, guidance=0.0).tokens, plain.tokens)
    guided = run(class_labels=labels, guidance=3.0)
    assert guided.nfe == 2 * plain.nfe and not torch.equal(guided.tokens, plain.tokens)
    assert not torch.equal(run(class_labels=1 - labels).tokens, plain.tokens)


def _red_pixels(png) -> int:
    """Pixels drawn in the strip's mask colour (0.85, 0.1, 0.1)."""
    import matplotlib.pyplot as plt

    rgb = plt.imread(png)[..., :3]
    return int((np.abs(rgb - np.array([0.85, 0.1, 0.1])).max(-1) < 0.03).sum())


def test_cli_sample_grid_strip_and_eval(tiny_run, tmp_path, capsys):
    from xdlm.cli import main
    from xdlm.commands.images import reference_classifier
    from xdlm.eval.images import classifier_features, frechet_distance

    run = str(tiny_run / "run")
    grid, strip = tmp_path / "g.png", tmp_path / "s.png"
    argv = ["images", "sample", "--ckpt", run, "--steps", "3", "--per-class", "2"]
    assert main([*argv, "--guidance", "1", "--out", str(grid), "--strip", str(strip)]) == 0
    assert "(2 classes x 2, 8 NFE)" in capsys.readouterr().out  # (3 steps + final) x 2 (CFG)
    assert _red_pixels(strip) > 0 and _red_pixels(grid) == 0  # masks only on the trajectory
    out = tmp_path / "m.json"
    argv = ["images", "eval", "--ckpt", run, "--steps", "2", "--per-class", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert (metrics["num_fake"], metrics["nfe"]) == (6, 3)
    # the same numbers from the library: the seed-0 samples, the cached reference classifier
    loaded, info = load_run(run), image_info(tiny_run / "data")
    fake = sample_classes(loaded, info, steps=2, per_class=3)
    clf, real = reference_classifier(str(tiny_run / "data"))
    with torch.no_grad():
        pred = clf(torch.from_numpy(fake.images).float()).argmax(-1)
    assert metrics["accuracy"] == pytest.approx(float((pred == fake.labels).float().mean()))
    fid = frechet_distance(
        classifier_features(clf, real.images), classifier_features(clf, fake.images)
    )
    assert metrics["fid"] == pytest.approx(fid) and metrics["num_real"] == len(real.images)
    s = sample_classes(loaded, info, steps=2, per_class=2, record=True)
    assert s.states.shape == (4, 4, 36)  # z_1, 2 steps, the final noise removal
    assert s.images.shape == (4, 6, 6)


def test_random_shift_translates_each_image_by_its_own_offset_with_zero_fill():
    from xdlm.eval.images import random_shift

    x = torch.arange(1, 2 * 5 * 6 + 1, dtype=torch.float32).reshape(2, 5, 6)
    assert random_shift(x, 0, torch.Generator().manual_seed(0)) is x
    out = random_shift(x, 2, torch.Generator().manual_seed(3))
    dy, dx = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(3))
    for b in range(2):  # reference: out[i, j] = x[i + dy − 2, j + dx − 2] or 0 off the image
        for i in range(5):
            for j in range(6):
                si, sj = i + int(dy[b]) - 2, j + int(dx[b]) - 2
                inside = 0 <= si < 5 and 0 <= sj < 6
                assert out[b, i, j] == (x[b, si, sj] if inside else 0.0)


def test_reference_classifier_learns_separable_classes():
    """Two classes told apart by which half of the image is lit, shifted by a pixel: the
    classifier must reach (almost) perfect held-out accuracy."""
    from xdlm.eval.images import classifier_accuracy, train_classifier

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=gen)
    images = 0.2 * torch.rand(400, 8, 8, generator=gen)
    images[labels == 0, :4] += 0.8
    images[labels == 1, 4:] += 0.8
    clf = train_classifier(images[:300].numpy(), labels[:300].numpy(), generator=gen, epochs=4)
    assert classifier_accuracy(clf, images[300:].numpy(), labels[300:].numpy()) >= 0.97
