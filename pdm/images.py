"""Model-range tensors as uint8 images and PNG grids (written atomically)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from pdm.atomic import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 NHWC."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC uint8 grid on a white background (torchvision's make_grid)."""
    n = images.shape[0]
    columns = columns or int(np.ceil(np.sqrt(n)))
    chw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    grid = make_grid(chw, nrow=columns, padding=pad, pad_value=255)
    if images.shape[-1] == 1:
        grid = grid[:1]  # make_grid repeats a single channel three times
    return grid.permute(1, 2, 0).numpy()


def save_grid(
    images: np.ndarray, path: str | os.PathLike, columns: int | None = None, scale: int = 1
) -> None:
    """Save uint8 NHWC images as one PNG grid (optionally enlarged by ``scale``)."""
    grid = grid_image(images, columns)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
