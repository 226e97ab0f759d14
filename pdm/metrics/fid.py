"""Fréchet distances through torchmetrics, with reference statistics stored once as .npz.

``FrechetInceptionDistance`` (torchmetrics, Inception-v3 from torch-fidelity) extracts the
features and computes the distance. Reference statistics (mu, sigma, n) of a dataset are
computed once, saved with :func:`save_stats` and loaded back into the metric's real-feature
state, so every later evaluation only passes the generated images through the network.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
)
DEFAULT_NUM_SAMPLES = 50_000  # the documented default for reported FIDs


def inception_weights_path(path: str | None = None) -> str:
    """The local Inception-v3 weights file: ``path``, $PDM_INCEPTION_WEIGHTS, or the torch hub cache.

    Nothing is downloaded; a missing file is a ValueError that says what to fetch and where.
    """
    candidates = [
        path,
        os.environ.get("PDM_INCEPTION_WEIGHTS"),
        os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE),
    ]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    where = path or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    raise ValueError(
        f"Inception-v3 weights not found at {where}. Download {INCEPTION_URL} on a machine with internet and "
        f"put it there (or pass --inception-weights PATH / set PDM_INCEPTION_WEIGHTS)"
    )


def make_fid(
    feature: nn.Module | None = None,
    inception_weights: str | None = None,
    input_img_size: tuple[int, int, int] = (3, 299, 299),
):
    """A torchmetrics FID metric: Inception-v3 pool features (2048) by default, or any module
    mapping uint8 images (N, C, H, W) to features (N, D)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature is None:
        return FrechetInceptionDistance(
            feature=2048,
            reset_real_features=False,
            feature_extractor_weights_path=inception_weights_path(inception_weights),
        )
    return FrechetInceptionDistance(
        feature=feature, reset_real_features=False, input_img_size=input_img_size
    )


@dataclass
class FeatureStats:
    """Mean, covariance and count of a set of features (ADM / torch-fidelity keep mu, sigma)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def save(self, path: str | os.PathLike) -> None:
        """Write to .npz atomically."""
        from pdm.atomic import atomic_write

        atomic_write(
            path,
            lambda tmp: np.savez(open(tmp, "wb"), mu=self.mu, sigma=self.sigma, n=np.int64(self.n)),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics written by :meth:`save` (or any .npz with mu and sigma)."""
        if not Path(path).is_file():
            raise ValueError(
                f"reference statistics {path} not found; compute them with `python -m pdm.metrics ref-stats`"
            )
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"{path} holds no mu/sigma arrays; it is not a statistics file")
            return cls(
                z["mu"].astype(np.float64),
                z["sigma"].astype(np.float64),
                int(z["n"]) if "n" in z else 0,
            )


def real_stats(metric) -> FeatureStats:
    """The real-image statistics accumulated in a torchmetrics FID metric."""
    n = int(metric.real_features_num_samples)
    if n < 2:
        raise ValueError("need at least 2 reference images to estimate a covariance")
    s = metric.real_features_sum.double()
    mu = s / n
    sigma = (metric.real_features_cov_sum.double() - n * torch.outer(mu, mu)) / (n - 1)
    return FeatureStats(mu.cpu().numpy(), sigma.cpu().numpy(), n)


def load_real_stats(metric, stats: FeatureStats) -> None:
    """Put stored reference statistics into a torchmetrics FID metric's real-feature state."""
    mu = torch.as_tensor(stats.mu, dtype=torch.float64)
    sigma = torch.as_tensor(stats.sigma, dtype=torch.float64)
    if mu.numel() != metric.real_features_sum.numel():
        raise ValueError(
            f"reference statistics have {mu.numel()} features, the metric {metric.real_features_sum.numel()}; "
            "they come from another feature extractor"
        )
    n = max(stats.n, 2)
    metric.real_features_sum = (n * mu).to(metric.real_features_sum)
    metric.real_features_cov_sum = ((n - 1) * sigma + n * torch.outer(mu, mu)).to(
        metric.real_features_cov_sum
    )
    metric.real_features_num_samples = torch.tensor(n, device=metric.real_features_sum.device)


def batches(images: np.ndarray, batch_size: int = 250) -> Iterable[Tensor]:
    """uint8 NHWC array -> uint8 NCHW tensors."""
    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)


def compute_stats(
    metric, images: np.ndarray | Iterable[np.ndarray], batch_size: int = 250
) -> FeatureStats:
    """Reference statistics of uint8 NHWC images: one array, or an iterable of batches (see
    :func:`pdm.metrics.sources.reference_batches`)."""
    metric.reset()
    metric.reset_real_features = True
    metric.reset()
    metric.reset_real_features = False
    chunks = [images] if isinstance(images, np.ndarray) else images
    for chunk in chunks:
        for b in batches(chunk, batch_size):
            metric.update(b, real=True)
    return real_stats(metric)


def fid_against(metric, stats: FeatureStats, images: np.ndarray, batch_size: int = 250) -> float:
    """The Fréchet distance of uint8 NHWC images to stored reference statistics."""
    load_real_stats(metric, stats)
    metric.fake_features_sum.zero_()
    metric.fake_features_cov_sum.zero_()
    metric.fake_features_num_samples.zero_()
    for b in batches(images, batch_size):
        metric.update(b, real=False)
    return float(metric.compute())


def load_images(path: str | os.PathLike, min_images: int = 1) -> np.ndarray:
    """uint8 NHWC images from a ``samples.npz`` (arr_0), a sample.py output folder (its
    samples.npz) or a folder of image files, checked: a ValueError names what is wrong and how to
    fix it."""
    path = Path(path)
    if path.is_dir() and (path / "samples.npz").is_file() and (path / "run.json").is_file():
        path = path / "samples.npz"  # a sample.py output folder: its samples, not its grid.png
    if path.is_file() and path.suffix == ".npz":
        images = _npz_images(path)
    elif path.is_dir():
        images = _folder_images(path)
    elif not path.exists():
        raise ValueError(
            f"{path} does not exist; give a sample.py output folder, its samples.npz or a folder "
            "of images"
        )
    else:
        raise ValueError(f"{path} is neither a samples.npz nor a folder of images")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        hint = (
            "; it looks like NCHW: transpose to NHWC"
            if images.ndim == 4 and images.shape[1] in (1, 3)
            else ""
        )
        raise ValueError(
            f"{path} holds images of shape {images.shape}; expected (N, H, W, 1 or 3){hint}"
        )
    if images.dtype != np.uint8:
        lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        raise ValueError(
            f"{path} holds {images.dtype} images in [{lo:.3g}, {hi:.3g}], expected uint8 in [0, 255]; "
            "convert them with (x * 255).round().astype(np.uint8) for [0, 1] data"
        )
    if len(images) < min_images:
        raise ValueError(f"{path} holds {len(images)} images; this needs at least {min_images}")
    return images


def _npz_images(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z:
                raise ValueError(
                    f"{path} has no arr_0 (keys: {', '.join(z.files) or 'none'}); pass a samples.npz "
                    "written by sample.py"
                )
            return z["arr_0"]
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path} is not a readable .npz ({type(e).__name__}); it may be truncated"
        ) from None


def _folder_images(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from pdm.data.datamodules import IMAGE_SUFFIXES

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"cannot read image {f}; delete or replace it") from None
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"the images under {path} differ in size; resize them to one size first")
    return np.stack(images)
