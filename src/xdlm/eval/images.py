"""Image metrics: an FID-style score on a small classifier's features, conditional accuracy and
per-class diversity; plus class-grid sampling shared by `xdlm images sample|eval`.

FID (Heusel et al.) between feature sets with means μ_r, μ_g and covariances Σ_r, Σ_g:

    FID = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r^{1/2} Σ_g Σ_r^{1/2})^{1/2})

The trace term uses the symmetric product Σ_r^{1/2} Σ_g Σ_r^{1/2} (PSD), so its square root is
an eigen-decomposition with eigenvalues clipped at 0: no complex parts, no scipy needed.

Without Inception weights (none here) the features are the penultimate layer (D = 64) of
`SmallCNN`, trained on the real training split (`train_classifier`). Users with Inception
weights pass image folders to `inception_fid` (torch-fidelity or pytorch-fid, optional imports).
Scores from different feature extractors or sample counts are not comparable.

    clf = train_classifier(train_images, train_labels, generator=torch.Generator().manual_seed(0))
    m = image_metrics(clf, real_images, fake_images, fake_labels)   # m.fid, m.accuracy, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xdlm.data.images import ImageInfo, tokens_to_images
from xdlm.sampling import generate


class SmallCNN(nn.Module):
    """Images (B, H, W) in [0, 1] -> logits (B, C); `features` is the penultimate (B, D).

    Two conv blocks (3×3 conv, ReLU, 3×3 conv, ReLU, 2×2 max-pool; 32 then 64 channels), average
    pooled to 3×3, a D-wide hidden layer and the class head: ≈ 0.1 M parameters, any H, W ≥ 4."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 64) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]  # fmt: skip

        self.conv = nn.Sequential(*block(1, 32), *block(32, 64), nn.AdaptiveAvgPool2d(3))
        self.fc = nn.Linear(64 * 9, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, D)."""
        return F.relu(self.fc(self.conv(images[:, None].float()).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of x (B, H, W) by its own integer (dy, dx) in [−s, s]², filling the
    uncovered border with 0 (background): the augmentation digit classifiers are trained with."""
    if max_shift == 0:
        return x
    s, (b, h, w) = max_shift, x.shape
    padded = F.pad(x, (s, s, s, s))
    dy, dx = torch.randint(0, 2 * s + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], rows, cols]


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    generator: torch.Generator,
    epochs: int = 12,
    batch_size: int = 128,
    lr: float = 3e-3,
    max_shift: int = 1,
) -> SmallCNN:
    """Fit a `SmallCNN` on images (N, H, W) in [0, 1] and labels (N,) with Adam, a one-cycle
    learning rate (warm-up, then cosine decay) and random shifts of up to `max_shift` pixels;
    returns it in eval mode."""
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=generator)))  # init
    model = SmallCNN(int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], max_shift, generator)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def _apply(fn, images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    x = torch.as_tensor(images, dtype=torch.float32)
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def classifier_features(model: SmallCNN, images: np.ndarray) -> np.ndarray:
    """Images (N, H, W) -> float64 features (N, D)."""
    return _apply(model.features, images).double().numpy()


def classifier_accuracy(model: SmallCNN, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of images (N, H, W) the classifier assigns to their label (N,)."""
    pred = _apply(model, images).argmax(-1).numpy()
    return float((pred == np.asarray(labels)).mean())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID-style Fréchet distance between Gaussians fitted to features (N_a, D) and (N_b, D)."""
    if feats_a.shape[1] != feats_b.shape[1] or min(len(feats_a), len(feats_b)) < 2:
        raise ValueError(f"need >= 2 rows of equal width, got {feats_a.shape}, {feats_b.shape}")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a = np.atleast_2d(np.cov(feats_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(feats_b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Σ_a^{1/2}
    middle = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_root = np.sqrt(np.clip(eig, 0, None)).sum()
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    return float(max(value, 0.0))


def class_diversity(feats: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the mean pairwise Euclidean feature distance within the class
    (features (N, D), labels (N,)); classes with < 2 samples are skipped."""
    values = []
    for c in np.unique(labels):
        f = feats[labels == c]
        if len(f) < 2:
            continue
        d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
        values.append(d.sum() / (len(f) * (len(f) - 1)))
    return float(np.mean(values)) if values else float("nan")


@dataclass(frozen=True)
class ImageMetrics:
    """fid (classifier features), accuracy (generated samples classified as their intended
    class), diversity (mean within-class feature distance; real_diversity for reference)."""

    fid: float
    accuracy: float
    diversity: float
    real_diversity: float
    num_fake: int
    num_real: int


def image_metrics(
    model: SmallCNN,
    real_images: np.ndarray,
    real_labels: np.ndarray,
    fake_images: np.ndarray,
    fake_labels: np.ndarray,
) -> ImageMetrics:
    """All metrics of generated images (N_g, H, W) for labels (N_g,) against real (N_r, H, W)."""
    real_f = classifier_features(model, real_images)
    fake_f = classifier_features(model, fake_images)
    return ImageMetrics(
        fid=frechet_distance(real_f, fake_f),
        accuracy=classifier_accuracy(model, fake_images, fake_labels),
        diversity=class_diversity(fake_f, np.asarray(fake_labels)),
        real_diversity=class_diversity(real_f, np.asarray(real_labels)),
        num_fake=len(fake_images),
        num_real=len(real_images),
    )


def inception_fid(real_dir: str, fake_dir: str, backend: str = "torch-fidelity") -> float:
    """Inception FID between two folders of PNGs via torch-fidelity or pytorch-fid (optional
    dependencies that download Inception weights on first use)."""
    if backend == "torch-fidelity":
        try:
            import torch_fidelity
        except ImportError as err:
            raise ValueError("backend torch-fidelity needs `pip install torch-fidelity`") from err
        out = torch_fidelity.calculate_metrics(input1=fake_dir, input2=real_dir, fid=True)
        return float(out["frechet_inception_distance"])
    if backend == "pytorch-fid":
        try:
            from pytorch_fid.fid_score import calculate_fid_given_paths
        except ImportError as err:
            raise ValueError("backend pytorch-fid needs `pip install pytorch-fid`") from err
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return float(calculate_fid_given_paths([real_dir, fake_dir], 50, device, 2048))
    raise ValueError(f"unknown FID backend {backend!r}; choose torch-fidelity or pytorch-fid")


@dataclass(frozen=True)
class ClassSamples:
    """tokens (C·N, L) and labels (C·N,) (class-major: N per class), images (C·N, H, W) in
    [0, 1], the trajectory states (S + 1, C·N, L) when recorded, and denoiser calls."""

    tokens: torch.Tensor
    labels: torch.Tensor
    images: np.ndarray
    states: torch.Tensor | None
    nfe: int


def sample_classes(
    loaded, info: ImageInfo, *, steps: int, per_class: int, guidance: float = 0.0,
    seed: int = 0, record: bool = False, conditional: bool = True, device: str = "cpu",
    **sampling,
) -> ClassSamples:  # fmt: skip
    """`per_class` samples of every class from a `load_run` result (null class when
    `conditional` is False). The cache is off: image models are time-conditioned. `sampling`:
    keywords of `generate` (sampler, final, grid, filter; `SamplingPlan.generate_kwargs()`)."""
    labels = torch.arange(info.num_classes, device=device).repeat_interleave(per_class)
    out = generate(
        loaded.model, loaded.kernel, loaded.schedule, batch_size=len(labels),
        seq_len=info.height * info.width, steps=steps, **sampling,
        generator=torch.Generator(device).manual_seed(seed), device=device,
        class_labels=labels if conditional else None, guidance=guidance, cache=False,
        record=record,
    )  # fmt: skip
    states = out.trajectory.states.cpu() if record and out.trajectory is not None else None
    tokens = out.tokens.cpu()
    return ClassSamples(tokens, labels.cpu(), tokens_to_images(tokens, info), states, out.nfe)
