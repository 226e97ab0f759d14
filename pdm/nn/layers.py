"""Building blocks of the PDM U-Net: the ADM family (Dhariwal & Nichol 2021) as PDM's code has it.

Where PDM's network departs from ADM (Luhman & Luhman 2022, the official PyTorch code):
- the sinusoidal time embedding puts sin before cos and spaces its frequencies over half-1;
- residual blocks take the time embedding as it leaves the embedding MLP (which ends with a
  SiLU) through a zero-initialised linear layer, and normalise before the scale-shift with
  a GroupNorm without affine parameters and eps = 1e-3;
- class conditioning gates each residual branch by sigmoid(Linear(class_emb) + 2);
- the down- and up-sampling convolutions change the channel count to the next level's width,
  the stride-2 one with TensorFlow's "SAME" padding (bottom/right only for even sizes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPS = 32


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) time labels, (B,) -> (B, dim): [sin | cos]
    with frequencies max_period^(-i / (dim/2 - 1)), i = 0 .. dim/2 - 1 (the DDPM TF convention)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=t.device)
        / max(half - 1, 1)
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 for half-precision inputs (as PDM's and
    ADM's ``GroupNorm32``); the output keeps the input's dtype. CUDA autocast does this for
    GroupNorm already, CPU autocast does not."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def group_norm(channels: int, affine: bool = True, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when the width is not a multiple of 32), as in ADM."""
    return GroupNorm32(math.gcd(GROUPS, channels), channels, eps=eps, affine=affine)


def group_norm_act(
    x: Tensor,
    norm: nn.GroupNorm,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    act: bool = True,
) -> Tensor:
    """``SiLU(norm(x) * (1 + scale) + shift)`` as one expression of a reduction and pointwise ops.

    The same function as the eager modules (statistics and arithmetic in float32, one cast back
    to x's dtype at the end), written so that ``torch.compile`` fuses it into one statistics pass
    and one pointwise pass in x's own memory format: the groups are a view of the channel axis
    (``unflatten``), so channels-last input is never copied to NCHW, as PyTorch's CUDA GroupNorm
    kernel does. Eager, it is slower than ``F.group_norm``; :func:`pdm.nn.runtime.fuse_norms`
    switches a network to it for compiled runs.
    """
    n, c = x.shape[:2]
    groups = x.unflatten(1, (norm.num_groups, c // norm.num_groups)).float()
    dims = tuple(range(2, groups.dim()))
    var, mean = torch.var_mean(groups, dim=dims, keepdim=True, correction=0)
    h = ((groups - mean) * torch.rsqrt(var + norm.eps)).flatten(1, 2)
    lift = (slice(None),) + (None,) * (x.dim() - 2)  # (C,) -> (C, 1, 1)
    if norm.weight is not None:
        h = h * norm.weight.float()[lift] + norm.bias.float()[lift]
    if scale is not None:
        h = h * (1.0 + scale.float()) + shift.float()
    if act:
        h = F.silu(h)
    return h.to(x.dtype)


def silu_(x: Tensor) -> Tensor:
    """SiLU, in place when autograd is not recording (x is then a fresh normalised tensor no one else holds)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def tf_same_pad(x: Tensor, kernel: int = 3, stride: int = 2) -> Tensor:
    """Pad like TensorFlow's "SAME": total padding max((ceil(n/s) - 1) s + k - n, 0) per side
    pair, the odd one at the end (so for even sizes a 3x3 stride-2 conv pads bottom/right only)."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution to ``out_channels`` (TF "SAME"
    padding), or average pooling when ``use_conv`` is False."""

    def __init__(
        self, channels: int, out_channels: int | None = None, use_conv: bool = True
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("average-pool downsampling cannot change the channel count")
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(tf_same_pad(x) if isinstance(self.op, nn.Conv2d) else x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then an optional 3x3 convolution to ``out_channels``."""

    def __init__(
        self, channels: int, out_channels: int | None = None, use_conv: bool = True
    ) -> None:
        super().__init__()
        self.conv = (
            nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None
        )

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning on time, optional resampling and class gating.

    h = conv(SiLU(GN(x))); h = GN'(h) * (1 + scale) + shift with (scale, shift) = Linear(emb);
    h = conv(dropout(SiLU(h))) * sigmoid(Linear(class_emb) + 2); out = skip(x) + h. GN' has no
    affine parameters (eps 1e-3); the gate starts near 0.88 so an untrained gate barely acts.
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
        self.emb_proj = zero_init(nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = group_norm(out_channels, affine=False, eps=1e-3)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.gate = nn.Linear(class_channels, out_channels) if class_channels else None
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    fused_norm = False  # group_norm_act instead of the eager modules (pdm.nn.runtime.fuse_norms)

    def forward(self, x: Tensor, emb: Tensor, class_emb: Tensor | None = None) -> Tensor:
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = group_norm_act(x, self.in_norm) if self.fused_norm else silu_(self.in_norm(x))
        h = self.in_conv(self.resample(h))
        x = self.resample(x)
        if self.fused_norm:
            h = group_norm_act(h, self.out_norm, scale, shift)
        else:
            h = silu_(torch.addcmul(shift, self.out_norm(h), 1.0 + scale))
        h = self.out_conv(self.dropout(h))
        if self.gate is not None and class_emb is not None:
            h = h * torch.sigmoid(self.gate(class_emb) + 2.0)[:, :, None, None]
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions, through PyTorch's SDPA.

    Heads are ``head_channels`` wide (64 in PDM); a layer narrower than that gets one head.
    The 1x1 projection emits q, k, v each as (heads, head_channels) channel blocks.
    """

    def __init__(self, channels: int, head_channels: int = 64) -> None:
        super().__init__()
        if channels > head_channels and channels % head_channels:
            raise ValueError(
                f"attention width {channels} is not a multiple of head_channels={head_channels}"
            )
        self.num_heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        # positions x (q|k|v, head, d) with d contiguous, which SDPA's fused kernels need (given
        # a stride-d layout the CPU falls back to the slow math path): free for a channels-last
        # activation, one copy for a contiguous one
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).contiguous()
        q, k, v = (
            qkv.reshape(b, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        )
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        # back to the input's layout in one copy, so the rest of the network keeps it
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            h = h.permute(0, 2, 1, 3).reshape(b, height, width, c).permute(0, 3, 1, 2)
        else:
            h = h.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj(h)
