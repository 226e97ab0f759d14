"""Building blocks of the ADM-family U-Net (Dhariwal & Nichol 2021) used by PDM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) time labels: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when the width is small), as in ADM."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3x3 convolution, or average pooling."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then an optional 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm, optional up/down-sampling and class gating.

    The time embedding sets a per-channel scale and shift of the second GroupNorm. PDM's
    class conditioning multiplies the residual branch by sigmoid(Linear(class_emb) + 2),
    which starts near 0.88 so an untrained gate barely changes the block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        class_channels: int | None = None,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.in_norm = group_norm(in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.resample: nn.Module
        if up:
            self.resample = Upsample(in_channels, use_conv=False)
        elif down:
            self.resample = Downsample(in_channels, use_conv=False)
        else:
            self.resample = nn.Identity()
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.gate = nn.Linear(class_channels, out_channels) if class_channels else None
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor, class_emb: Tensor | None = None) -> Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self.resample(h))
        x = self.resample(x)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        if self.gate is not None and class_emb is not None:
            h = h * torch.sigmoid(self.gate(class_emb) + 2.0)[:, :, None, None]
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions (PyTorch SDPA).

    Heads are ``head_channels`` wide (64 in ADM/PDM); a layer narrower than that gets one head.
    """

    def __init__(self, channels: int, head_channels: int = 64) -> None:
        super().__init__()
        if channels > head_channels and channels % head_channels:
            raise ValueError(f"attention width {channels} is not a multiple of head_channels={head_channels}")
        self.num_heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        qkv = rearrange(self.qkv(self.norm(x)), "b (k n d) h w -> k b n (h w) d", k=3, n=self.num_heads)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        h = rearrange(h, "b n (h w) d -> b (n d) h w", h=height, w=width)
        return x + self.proj(h)
