"""The PDM U-Net: an ADM-family U-Net that runs on the patch-concatenated image.

Patching is the first operation and un-patching the last (Luhman & Luhman 2022): a
(B, C, H, W) image becomes a (B, C*P^2, H/P, W/P) grid, the first 3x3 convolution takes
C*P^2 channels, and a fixed 2-D sinusoidal encoding is added right after it. Everything in
between is ADM, with two PDM choices: the time-embedding width is
model_channels * channel_mult[-1], and class conditioning gates the residual branches.
With patch_size = 1 and no positional encoding the network is a plain ADM-style U-Net.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdm.nn.layers import AttentionBlock, Downsample, ResBlock, Upsample, group_norm, timestep_embedding, zero_init
from pdm.patching import patchify, positional_encoding_2d, unpatchify


class _Level(nn.Module):
    """One resolution step of the U-Net: a residual block, optionally followed by attention."""

    def __init__(self, res: ResBlock | None, attn: AttentionBlock | None, resample: nn.Module | None = None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn
        self.resample = resample

    def forward(self, h: Tensor, emb: Tensor, class_emb: Tensor | None) -> Tensor:
        if self.res is not None:
            h = self.res(h, emb, class_emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.resample is not None:
            h = self.resample(h, emb, class_emb) if isinstance(self.resample, ResBlock) else self.resample(h)
        return h


class UNet(nn.Module):
    """ADM-family U-Net on the patched grid.

    Args:
        in_channels: colour channels C of the image.
        image_size: side of the (square) training image; the grid side is image_size / P.
        patch_size: P; 1 gives the un-patched baseline.
        model_channels: base width; level i has width int(model_channels * channel_mult[i]).
        channel_mult: width multipliers per level (fractions allowed, e.g. 1.5).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: grid sides (after patching) that get self-attention.
        num_classes: K adds a class table of K + 1 rows; row K is the null label for CFG.
        dropout: dropout inside residual blocks.
        head_channels: channels per attention head (64 in ADM/PDM).
        resblock_updown: resample inside residual blocks (BigGAN-style) instead of with
            strided conv / nearest+conv; PDM's official models use the latter.
        positional_encoding: add the 2-D encoding after the first conv (default: P > 1).
        time_embed_dim: width of the time embedding (default model_channels * channel_mult[-1]).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 1,
        model_channels: int = 128,
        channel_mult: Sequence[float] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        num_classes: int | None = None,
        dropout: float = 0.0,
        head_channels: int = 64,
        resblock_updown: bool = False,
        positional_encoding: bool | None = None,
        time_embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not divisible by patch_size={patch_size}; choose a patch size that divides it"
            )
        grid = image_size // patch_size
        levels = len(channel_mult)
        if grid % (2 ** (levels - 1)):
            raise ValueError(
                f"the patched grid side {grid} (= {image_size}/{patch_size}) cannot be halved {levels - 1} times "
                f"for channel_mult={tuple(channel_mult)}; use fewer levels or a smaller patch size"
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be positive or None, got {num_classes}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.widths = [int(model_channels * m) for m in channel_mult]
        use_pe = patch_size > 1 if positional_encoding is None else positional_encoding
        patched_channels = in_channels * patch_size**2

        self.time_embed_dim = time_embed_dim or self.widths[-1]
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, self.time_embed_dim), nn.SiLU(), nn.Linear(self.time_embed_dim, self.time_embed_dim)
        )
        class_dim = self.widths[0] if num_classes is not None else None
        self.class_embed = nn.Embedding(num_classes + 1, class_dim) if num_classes is not None else None

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, cout, self.time_embed_dim, dropout, class_dim, **kw)

        def attn(ch: int, side: int) -> AttentionBlock | None:
            return AttentionBlock(ch, head_channels) if side in attention_resolutions else None

        self.input_conv = nn.Conv2d(patched_channels, model_channels, 3, padding=1)
        if use_pe:
            self.register_buffer("pos_enc", positional_encoding_2d(model_channels, grid, grid), persistent=False)
        else:
            self.pos_enc = None

        self.down = nn.ModuleList()
        skip_widths = [model_channels]
        ch, side = model_channels, grid
        for level, width in enumerate(self.widths):
            for _ in range(num_res_blocks):
                self.down.append(_Level(res(ch, width), attn(width, side)))
                ch = width
                skip_widths.append(ch)
            if level != levels - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.down.append(_Level(None, None, down))
                side //= 2
                skip_widths.append(ch)

        self.middle = nn.ModuleList([res(ch, ch), AttentionBlock(ch, head_channels), res(ch, ch)])

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            width = self.widths[level]
            for i in range(num_res_blocks + 1):
                up: nn.Module | None = None
                if level and i == num_res_blocks:
                    up = res(width, width, up=True) if resblock_updown else Upsample(width)
                self.up.append(_Level(res(ch + skip_widths.pop(), width), attn(width, side), up))
                ch = width
                if up is not None:
                    side *= 2

        self.out_norm = group_norm(ch)
        self.out_conv = zero_init(nn.Conv2d(ch, patched_channels, 3, padding=1))

    def forward(self, x: Tensor, t_label: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from a noisy image.

        Args:
            x: (B, C, H, W) noisy images, H and W divisible by P.
            t_label: (B,) or scalar network time labels (see ``VPSchedule.label``).
            y: (B,) class labels in [0, num_classes]; num_classes is the null label.
               None on a conditional model means "unconditional" (the null label).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        t_label = torch.as_tensor(t_label, device=x.device)
        if t_label.ndim == 0:
            t_label = t_label.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t_label, self.model_channels).to(x.dtype))
        class_emb = None
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            class_emb = self.class_embed(y)
        elif y is not None:
            raise ValueError("class labels were given to an unconditional model; build it with num_classes")

        h = self.input_conv(patchify(x, self.patch_size))
        if self.pos_enc is not None:
            pe = self.pos_enc
            if pe.shape[-2:] != h.shape[-2:]:
                pe = positional_encoding_2d(self.model_channels, h.shape[-2], h.shape[-1], device=h.device)
            h = h + pe.to(h.dtype)
        skips = [h]
        for block in self.down:
            h = block(h, emb, class_emb)
            skips.append(h)
        h = self.middle[0](h, emb, class_emb)
        h = self.middle[1](h)
        h = self.middle[2](h, emb, class_emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, class_emb)
        h = self.out_conv(F.silu(self.out_norm(h)))
        return unpatchify(h, self.patch_size)
