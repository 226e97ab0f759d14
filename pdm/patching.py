"""Patching for Patched Diffusion Models (Luhman & Luhman 2022, arXiv 2207.04316, Sec. 3).

An image (B, C, H, W) becomes a grid (B, C*P^2, H/P, W/P). Channel k of the grid holds
row-in-patch dy, column-in-patch dx and colour c with k = (dy * P + dx) * C + c: the
ViT/DiT ``(p q c)`` order. ``torch.nn.functional.pixel_unshuffle`` orders the channels
``(c p q)`` instead, so it is not used here.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor


def _check(height: int, width: int, patch_size: int) -> None:
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by patch_size={patch_size}; "
            f"resize or crop the images to a multiple of {patch_size}, or pick a patch size that divides {math.gcd(height, width)}"
        )


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, C*P^2, H/P, W/P) in the PDM channel order."""
    _check(x.shape[-2], x.shape[-1], patch_size)
    return rearrange(x, "b c (h p) (w q) -> b (p q c) h w", p=patch_size, q=patch_size)


def unpatchify(y: Tensor, patch_size: int) -> Tensor:
    """The inverse of :func:`patchify`: (B, C*P^2, h, w) -> (B, C, h*P, w*P)."""
    if patch_size < 1 or y.shape[1] % (patch_size * patch_size):
        raise ValueError(f"{y.shape[1]} channels cannot be un-patched with patch_size={patch_size}")
    return rearrange(y, "b (p q c) h w -> b c (h p) (w q)", p=patch_size, q=patch_size)


def positional_encoding_2d(
    channels: int,
    height: int,
    width: int,
    max_period: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """PDM's fixed 2-D sinusoidal encoding, shape (channels, height, width).

    The first half of the channels encodes the column x, the second half the row y; channel i
    of a half holds sin(pos * f_i * 64 / n) with f_i = max_period^(-i / (channels/2 - 1)) and n
    the side along that axis. The factor 64 / n ("higher resolutions need longer wavelengths")
    and the sine-only form follow the official PDM code. PDM adds it right after the first
    convolution so the network knows where each patch sits.
    """
    if channels % 2 or channels < 4:
        raise ValueError(
            f"the 2-D positional encoding needs an even number of channels >= 4, got {channels}"
        )
    half = channels // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float64, device=device) / (half - 1)
    )

    def axis(n: int) -> Tensor:  # (half, n)
        pos = torch.arange(n, dtype=torch.float64, device=device)
        return torch.sin(freqs[:, None] * pos[None, :] * (64.0 / n))

    enc_x = axis(width)[:, None, :].expand(-1, height, -1)  # varies along columns
    enc_y = axis(height)[:, :, None].expand(-1, -1, width)  # varies along rows
    return torch.cat([enc_x, enc_y], dim=0).to(dtype)
