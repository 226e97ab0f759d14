"""Image transforms shared by the data modules."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with box filtering while large, resize bicubically so the short
    side is ``size``, then crop the centre square (Dhariwal & Nichol 2021, image_datasets.py)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def to_model_range(image: Image.Image, channels: int = 3) -> torch.Tensor:
    """PIL image -> float tensor (C, H, W) in [-1, 1]."""
    image = image.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageTransform:
    """Centre crop to ``size``, optional random horizontal flip, to [-1, 1]."""

    def __init__(self, size: int, channels: int = 3, random_flip: bool = True) -> None:
        self.size, self.channels, self.random_flip = size, channels, random_flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = to_model_range(adm_center_crop(image.convert("RGB"), self.size), self.channels)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x
