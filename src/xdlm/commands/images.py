"""`xdlm images`: image tokens -> shards, class-grid sampling with guidance, FID-style metrics.

    xdlm images prepare --npz ../shared/data/images/mnist10k.npz --out runs/data/mnist14-l4 \\
        --size 14 --levels 4                       # or --kind vq for an .npz of VQ codes
    xdlm train --config configs/mnist.yaml --out runs/mnist/k0.1
    xdlm images sample --ckpt runs/mnist/k0.1 --steps 16 --per-class 8 --guidance 1.0 \\
        --out grid.png --strip traj.png            # rows = classes; strip = denoising trajectory
    xdlm images eval --ckpt runs/mnist/k0.1 --steps 16 --per-class 20 --guidance 1.0 \\
        [--inception torch-fidelity]               # classifier FID + accuracy + diversity (JSON)

The dataset's image shape and levels come from the manifest of the run's `data.path`. Settings:
the `sample` section (steps, guidance, sampler, seed, precision, device ...) and the `images`
section (per_class, inception) of the config schema, starting from the run's saved config less
the invocation's settings (`xdlm.invocation`: only the sampler choice carries over; steps,
guidance and per_class are the defaults unless given); `--config FILE` and `--set sample.steps=8`
work as in `xdlm train`. `--trust-remote-code`: a model with Python code of its own may load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from xdlm.commands.options import (
    add_config_arguments,
    add_trust_argument,
    command_config,
    shorthand,
)
from xdlm.config import ImagesConfig, SampleConfig, choices
from xdlm.precision import inference_precision


def register(sub) -> None:
    p = sub.add_parser(
        "images",
        help="image tokens: prepare, sample grids, FID-style metrics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True)
    prep = actions.add_parser("prepare", help="an .npz of images or VQ codes -> shards")
    prep.add_argument("--npz", required=True, help="images+labels or codes+labels (docs/images.md)")
    prep.add_argument("--out", required=True)
    prep.add_argument("--kind", choices=["pixels", "patches", "vq"], default="pixels")
    prep.add_argument("--size", type=int, default=14, help="pixels/patches: resize to SIZE x SIZE")
    prep.add_argument("--levels", type=int, default=8, help="pixels/patches: grey levels")
    prep.add_argument(
        "--patch",
        type=int,
        default=2,
        help="patches: PATCH x PATCH pixels per token (levels^(PATCH^2) codes)",
    )
    prep.add_argument("--codebook-size", type=int, default=None, help="vq: codebook size")
    prep.add_argument("--valid-fraction", type=float, default=0.1)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--overwrite", action="store_true")
    for name, help_ in (("sample", "write a PNG grid (rows = classes)"), ("eval", "metrics")):
        q = actions.add_parser(name, help=help_)
        q.add_argument("--ckpt", required=True, help="run dir or checkpoint dir")
        q.add_argument("--out", default=None, help="grid PNG (sample) / JSON (eval)")
        add_config_arguments(q, "sample / images")
        add_trust_argument(q)
        shorthand(q, "--steps", key="sample.steps", type=int)
        shorthand(q, "--per-class", key="images.per_class", type=int)
        shorthand(q, "--guidance", key="sample.guidance", type=float, help="CFG scale w")
        shorthand(q, "--sampler", key="sample.sampler", choices=choices(SampleConfig, "sampler"))
        shorthand(q, "--seed", key="sample.seed", type=int)
        shorthand(q, "--precision", key="sample.precision",
                  choices=choices(SampleConfig, "precision"))  # fmt: skip
    actions.choices["sample"].add_argument("--strip", default=None, help="trajectory PNG / GIF")
    shorthand(actions.choices["eval"], "--inception", key="images.inception",
              choices=choices(ImagesConfig, "inception"),
              help="also Inception FID against the valid split (optional dependency)")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    if args.action == "prepare":
        from xdlm.data.images import prepare_images

        m = prepare_images(
            args.npz, args.out, args.kind, args.size, args.levels, args.codebook_size,
            args.valid_fraction, args.seed, args.overwrite, args.patch,
        )  # fmt: skip
        rows = {name: info.rows for name, info in m.splits.items()}
        print(f"prepared {rows} images, image={m.image}, vocab_size={m.vocab_size} -> {args.out}")
        return 0
    return _sample(args) if args.action == "sample" else _eval(args)


def _load(args):
    """The run, its image info and class-grid samples, with the `sample` / `images` settings."""
    from xdlm import runs
    from xdlm.builders import build_device, build_sampler, resolve_sampling
    from xdlm.data.images import image_info
    from xdlm.eval.images import sample_classes

    cfg = command_config(args)
    s = cfg.sample
    device = build_device(s.device)
    loaded = runs.load_run(
        args.ckpt, device=device, use_ema=s.use_ema, trust_remote_code=args.trust_remote_code
    )
    info = image_info(loaded.config.data.path)
    s = resolve_sampling(s, cfg.model, loaded.kernel.mask_id)
    chosen = inference_precision(
        s.precision,
        device,
        loaded.model,
        info.num_classes * cfg.images.per_class,
        info.height * info.width,
        loaded.kernel.vocab_size,
    )
    with chosen.autocast(device):
        samples = sample_classes(
            loaded, info, steps=s.steps, per_class=cfg.images.per_class, guidance=s.guidance,
            seed=s.seed, record=bool(getattr(args, "strip", None)), device=device,
            **build_sampler(s).generate_kwargs(),
        )  # fmt: skip
    return cfg, loaded, info, samples


def _sample(args) -> int:
    cfg, _, info, samples = _load(args)
    out, per_class = args.out or "grid.png", cfg.images.per_class
    save_grid(samples.images, per_class, out, f"{cfg.sample.steps} steps, w={cfg.sample.guidance}")
    print(f"wrote {out} ({info.num_classes} classes x {per_class}, {samples.nfe} NFE)")
    if args.strip:
        pick = np.arange(info.num_classes) * per_class  # one sample per class
        save_strip(samples.states[:, pick], info, args.strip)
        print(f"wrote {args.strip}")
    return 0


def _eval(args) -> int:
    from xdlm.eval.images import image_metrics

    cfg, loaded, info, samples = _load(args)
    clf, real = reference_classifier(loaded.config.data.path)
    metrics = image_metrics(clf, real.images, real.labels, samples.images, samples.labels.numpy())
    result = {"ckpt": str(loaded.checkpoint), "steps": cfg.sample.steps,
              "guidance": cfg.sample.guidance, "sampler": cfg.sample.sampler or "ancestral",
              "per_class": cfg.images.per_class, "nfe": samples.nfe, **vars(metrics)}  # fmt: skip
    if cfg.images.inception:
        result["inception_fid"] = _inception(cfg.images.inception, real.images, samples.images)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


class _Split:
    def __init__(self, data_dir: str, split: str):
        from xdlm.data.images import image_info, tokens_to_images
        from xdlm.data.loader import TokenShards

        shards = TokenShards(data_dir, split)
        rows = shards.rows(np.arange(len(shards)))
        self.images = tokens_to_images(rows.tokens, image_info(shards.manifest))
        self.labels = rows.labels.numpy()


def reference_classifier(data_dir: str, seed: int = 0):
    """(classifier trained on the train split, the valid split as `.images`/`.labels`); the
    classifier is cached as `{data_dir}/classifier-v2-s{seed}.pt` (v2: the 2-block CNN with
    shift augmentation; an older cache of the 1-block CNN is not read)."""
    import pickle

    import torch

    from xdlm.eval.images import SmallCNN, train_classifier

    path = Path(data_dir) / f"classifier-v2-s{seed}.pt"
    real = _Split(data_dir, "valid")
    if path.is_file():
        clf = SmallCNN(int(real.labels.max()) + 1)
        try:
            clf.load_state_dict(torch.load(path, weights_only=True))
        except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
            raise ValueError(
                f"{path} (the cached metric classifier) is corrupt or not plain tensors "
                f"({type(err).__name__}); delete it and it is trained again"
            ) from None
        return clf.eval(), real
    train = _Split(data_dir, "train")
    clf = train_classifier(
        train.images, train.labels, generator=torch.Generator().manual_seed(seed)
    )
    torch.save(clf.state_dict(), path)
    return clf, real


def _inception(backend: str, real: np.ndarray, fake: np.ndarray) -> float:
    import tempfile

    from xdlm.eval.images import inception_fid

    with tempfile.TemporaryDirectory() as tmp:
        for name, images in (("real", real), ("fake", fake)):
            (Path(tmp) / name).mkdir()
            for i, img in enumerate(images):
                _save_png(np.repeat(img[..., None], 3, -1), Path(tmp) / name / f"{i}.png")
        return inception_fid(f"{tmp}/real", f"{tmp}/fake", backend)


def _save_png(rgb: np.ndarray, path) -> None:
    import matplotlib.pyplot as plt

    plt.imsave(path, np.clip(rgb, 0, 1))


def _tile(images: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
    """(N, H, W[, 3]) -> one (rows·(H+pad), cols·(W+pad)[, 3]) canvas, row-major."""
    n, h, w = images.shape[:3]
    rows = -(-n // cols)
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, *images.shape[3:]))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + c * (w + pad) : pad + c * (w + pad) + w,
        ] = img  # noqa: E501
    return canvas


def save_grid(images: np.ndarray, per_class: int, path, title: str = "") -> None:
    """Images (C·N, H, W) in [0, 1], class-major -> PNG with one row per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    canvas = _tile(images, per_class)
    fig, ax = plt.subplots(
        figsize=(
            max(2.0, per_class * 0.5),
            canvas.shape[0] / canvas.shape[1] * max(2.0, per_class * 0.5) + 0.4,
        )
    )  # noqa: E501
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * (images.shape[1] + 1) for i in range(len(images) // per_class)])
    ax.set_yticklabels(range(len(images) // per_class))
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def save_strip(states, info, path, columns: int = 8) -> None:
    """Trajectory states (S + 1, B, L) -> PNG (or GIF if `path` ends in .gif): rows = samples,
    `columns` evenly spaced steps; masked positions are red."""
    from xdlm.data.images import expand_patches, tokens_to_images

    s = np.asarray(states)
    picks = np.unique(np.linspace(0, len(s) - 1, columns).round().astype(int))
    frames = []
    for i in picks:
        grey = tokens_to_images(s[i], info)
        rgb = np.repeat(grey[..., None], 3, -1)
        masked = s[i].reshape(len(grey), info.height, info.width) == info.levels  # the mask id
        rgb[expand_patches(masked, info.patch)] = (0.85, 0.1, 0.1)
        frames.append(rgb)
    if str(path).endswith(".gif"):
        from PIL import Image

        imgs = [
            Image.fromarray((_tile(f, 1) * 255).astype(np.uint8)).resize((60, 60 * len(f)))
            for f in frames
        ]  # noqa: E501
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=300, loop=0)
        return
    stacked = np.stack(frames, 1).reshape(-1, *frames[0].shape[1:])  # (B·cols, H, W, 3)
    _save_png(_tile(stacked, len(picks)), path)
