"""Photographs with no download: crops of the two 427x640 RGB photographs that scikit-learn
installs with itself (``sklearn.datasets.load_sample_images``: a temple in China and a flower).

Each photograph is shrunk by ``downscale`` and split by columns into a training region (the left
``1 - heldout_fraction``) and a held-out region (the rest), with a ``gap`` of columns between the
two that no crop touches, so that no held-out pixel was ever seen in training, not even through
the resampling filter. Training crops are drawn from the training region by ``seed`` (position
and horizontal flip); the held-out crops from the held-out region by a fixed seed of their own,
so every run scored on them, whatever its ``seed``, sees the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pdm.data.loading import DataModuleBase

HELDOUT_SEED = 1_000_003  # the held-out crops are the same for every training seed


@dataclass(frozen=True)
class Region:
    """Columns [left, right) of photograph ``photo`` (after downscaling)."""

    photo: int
    left: int
    right: int


def sample_photographs(downscale: float = 2.0) -> list[np.ndarray]:
    """scikit-learn's sample photographs as uint8 (H, W, 3) arrays, shrunk by ``downscale``
    (box-filtered, so that a crop holds more of the scene)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if downscale < 1:
        raise ValueError(
            f"downscale must be at least 1 (the photographs are 427x640), got {downscale}"
        )
    photos = []
    for arr in load_sample_images().images:
        image = Image.fromarray(arr)
        size = (round(image.width / downscale), round(image.height / downscale))
        photos.append(np.asarray(image.resize(size, resample=Image.BOX)))
    return photos


def regions(
    photos: list[np.ndarray], heldout_fraction: float, gap: int
) -> tuple[list[Region], list[Region]]:
    """The training and held-out regions of each photograph (columns, ``gap`` apart)."""
    train, held = [], []
    for i, photo in enumerate(photos):
        width = photo.shape[1]
        boundary = round(width * (1 - heldout_fraction))
        train.append(Region(i, 0, boundary))
        held.append(Region(i, boundary + gap, width))
    return train, held


def draw_crops(
    photos: list[np.ndarray], where: list[Region], size: int, count: int, seed: int, flip: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """``count`` crops of ``size`` x ``size`` inside ``where`` (regions taken in turn), uint8
    (N, 3, size, size), and their (photo, top, left, flipped) as an (N, 4) array."""
    g = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), dtype=np.uint8)
    meta = np.empty((count, 4), dtype=np.int64)
    for k in range(count):
        region = where[k % len(where)]
        photo = photos[region.photo]
        if region.right - region.left < size or photo.shape[0] < size:
            raise ValueError(
                f"a {size}x{size} crop does not fit a {photo.shape[0]}x{region.right - region.left} "
                "region; lower image_size, downscale or heldout_fraction"
            )
        top = int(g.integers(0, photo.shape[0] - size + 1))
        left = int(g.integers(region.left, region.right - size + 1))
        flipped = bool(flip and g.random() < 0.5)
        crop = photo[top : top + size, left : left + size]
        out[k] = (crop[:, ::-1] if flipped else crop).transpose(2, 0, 1)
        meta[k] = (region.photo, top, left, int(flipped))
    return torch.from_numpy(out), meta


class _Crops(Dataset):
    """uint8 crops served as float (3, H, W) in [-1, 1] with the label -1 (unconditional)."""

    def __init__(self, crops: torch.Tensor, meta: np.ndarray) -> None:
        self.crops, self.meta = crops, meta

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int):
        return self.crops[i].float() / 127.5 - 1.0, -1


class PhotoCropsDataModule(DataModuleBase):
    """Random crops of scikit-learn's two sample photographs (see the module docstring).

    Args:
        image_size: the crops' side (32 or 64 for minutes-long runs on a CPU).
        downscale: shrink the 427x640 photographs by this factor first.
        num_train: training crops drawn by ``seed`` (a fixed set, re-shuffled every epoch).
        num_heldout: held-out crops (the validation set), the same for every ``seed``.
        heldout_fraction: the share of each photograph's width kept for held-out crops.
        gap: columns between the two regions that no crop uses.
        random_flip: flip half the training crops horizontally.
    """

    channels = 3
    num_classes = None

    def __init__(
        self,
        image_size: int = 32,
        downscale: float = 2.0,
        num_train: int = 16384,
        num_heldout: int = 512,
        heldout_fraction: float = 0.25,
        gap: int = 4,
        random_flip: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, 0.0, seed, shuffle_seed=shuffle_seed)
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        if num_train < batch_size or num_heldout < 1:
            raise ValueError("num_train must hold at least one batch, num_heldout one crop")
        self.image_size, self.downscale = image_size, downscale
        self.num_train, self.num_heldout = num_train, num_heldout
        self.heldout_fraction, self.gap, self.random_flip = heldout_fraction, gap, random_flip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        photos = sample_photographs(self.downscale)
        train, held = regions(photos, self.heldout_fraction, self.gap)
        size = self.image_size
        self.train_set = _Crops(
            *draw_crops(photos, train, size, self.num_train, self.seed, self.random_flip)
        )
        self.val_set = _Crops(
            *draw_crops(photos, held, size, self.num_heldout, HELDOUT_SEED, flip=False)
        )


def save_crops_grid(
    path: str, count: int = 32, image_size: int = 32, downscale: float = 2.0
) -> None:
    """A PNG of real crops, 8 a row: training crops in the top half, held-out crops (the right
    quarter of each photograph) in the bottom half, so a reader sees what the dataset holds."""
    from PIL import Image

    from pdm.atomic import atomic_write
    from pdm.images import grid_image

    data = PhotoCropsDataModule(
        image_size=image_size, downscale=downscale, num_train=count, num_heldout=count, batch_size=1
    )
    data.setup("fit")
    half = count // 2
    both = torch.cat([data.train_set.crops[:half], data.val_set.crops[:half]])
    image = Image.fromarray(np.squeeze(grid_image(both.permute(0, 2, 3, 1).numpy(), columns=8)))
    image = image.resize((image.width * 3, image.height * 3), Image.NEAREST)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
