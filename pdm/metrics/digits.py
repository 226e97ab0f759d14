"""Offline evaluation of the embedded digits: their native 8x8 grey levels as features.

The UCI digits are 8x8 images with 17 grey levels; our 32x32 versions are bilinear upsamplings.
Average-pooling back to 8x8 gives a 64-dimensional feature that needs no downloaded network.
The Fréchet distance on it ("FD-8x8") is a pixel-space statistic: it tells how well the
sampled images match the first two moments of the real digits, not perceptual quality.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DigitsFeatures(nn.Module):
    """uint8 (N, C, H, W) -> (N, 64): grey levels average-pooled to 8x8, scaled to [0, 1]."""

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() / 255.0
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        return F.adaptive_avg_pool2d(x, self.size).flatten(1).double()


def digits_fd_metric():
    """A torchmetrics FID metric on :class:`DigitsFeatures` for 1x32x32 images."""
    from pdm.metrics.fid import make_fid

    return make_fid(feature=DigitsFeatures(), input_img_size=(1, 32, 32))


def digits_reference_images(image_size: int = 32) -> torch.Tensor:
    """All 1,797 digits as uint8 NHWC, the reference set of the digits FD."""
    from pdm.data import load_digits_tensor

    x, _ = load_digits_tensor(image_size)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def digits_fd_baseline(num: int, seed: int = 0, draws: int = 5):
    """Reference statistics of all digits, and the FD a perfect model scores with ``num`` samples.

    A perfect model draws independently from the data distribution, so the floor is the FD of
    ``num`` real digits drawn *with replacement*, averaged over ``draws`` draws. (Drawing them
    without replacement from the 1,797 reference digits themselves understates it: by 1.5x at
    500 samples and 2.3x at 1,000, where a perfect model would score 0.0143 +- 0.0017.)
    """
    from pdm.metrics.fid import compute_stats, fid_against

    ref_images = digits_reference_images().numpy()
    metric = digits_fd_metric()
    stats = compute_stats(metric, ref_images)
    g = torch.Generator().manual_seed(seed)
    floors = [
        fid_against(
            metric, stats, ref_images[torch.randint(len(ref_images), (num,), generator=g).numpy()]
        )
        for _ in range(draws)
    ]
    return stats, sum(floors) / draws


@functools.lru_cache(maxsize=1)
def digits_classifier():
    """An RBF support-vector classifier of the 8x8 grey levels, fit on all 1,797 real digits.

    Its 5-fold cross-validated accuracy on real digits is 99.0% (:func:`real_digits_accuracy`),
    so it tells whether generated digits read as their labels.
    """
    images = digits_reference_images()
    features = DigitsFeatures()(images.permute(0, 3, 1, 2)).numpy()
    return _svm().fit(features, _digit_labels())


def _svm():
    from sklearn.svm import SVC

    return SVC(gamma=0.2, C=10.0)  # chosen by 5-fold cross-validation on the real digits


def real_digits_accuracy(folds: int = 5) -> float:
    """Cross-validated accuracy of the classifier on real digits (its ceiling)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    features = DigitsFeatures()(digits_reference_images().permute(0, 3, 1, 2)).numpy()
    folds_ = StratifiedKFold(folds, shuffle=True, random_state=0)
    return float(cross_val_score(_svm(), features, _digit_labels(), cv=folds_).mean())


def classifier_accuracy(images, labels) -> float:
    """The fraction of uint8 NHWC digit images the classifier reads as their labels."""
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    predicted = digits_classifier().predict(DigitsFeatures()(x).numpy())
    return float((predicted == np.asarray(labels)).mean())


def _digit_labels():
    from pdm.data import load_digits_tensor

    return load_digits_tensor(8)[1].numpy()
