"""The PDM U-Net: PDM's ADM-family U-Net running on the patch-concatenated image.

Patching is the first operation and un-patching the last (Luhman & Luhman 2022): a
(B, C, H, W) image becomes a (B, C*P^2, H/P, W/P) grid, the first 3x3 convolution takes
C*P^2 channels, and a fixed 2-D sinusoidal encoding is added right after it. In between is
the official PDM network, block for block: level widths w_i = int(model_channels *
channel_mult[i]); a time-embedding MLP model_channels -> 4 model_channels -> w_last; the
down- and up-sampling convolutions change the width to the next level's; the class table
has num_classes + 1 rows (the last is the null label) of width w_0. With the same weights
it computes the same function as the official ``UNetModel`` (learned-variance head aside);
:func:`pdm.nn.convert_official_state_dict` maps its checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pdm.nn.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    group_norm_act,
    silu_,
    timestep_embedding,
    zero_init,
)
from pdm.patching import patchify, positional_encoding_2d, unpatchify


class _Level(nn.Module):
    """One block of a U-Net path: a residual block, attention, and a resampling layer, each optional."""

    def __init__(
        self, res: ResBlock | None, attn: AttentionBlock | None, resample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, h: Tensor, emb: Tensor, class_emb: Tensor | None) -> Tensor:
        if self.res is not None:
            h = self.res(h, emb, class_emb)
        if self.attn is not None:
            h = self.attn(h)
        if isinstance(self.resample, ResBlock):
            h = self.resample(h, emb, class_emb)
        elif self.resample is not None:
            h = self.resample(h)
        return h


class UNet(nn.Module):
    """PDM's U-Net on the patched grid.

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
        head_channels: channels per attention head (64 in PDM).
        resblock_updown: resample inside residual blocks (BigGAN-style) instead of with a
            strided / upsampling convolution; PDM's official models use the latter.
        positional_encoding: add the 2-D encoding after the first conv (default: P > 1; the
            official code adds it at P = 1 too, pass True to match it there).
        time_embed_dim: width of the time embedding (default: the last level's width, as PDM).
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
        self.config: dict[str, Any] = dict(
            in_channels=in_channels,
            image_size=image_size,
            patch_size=patch_size,
            model_channels=model_channels,
            channel_mult=[float(m) for m in channel_mult],
            num_res_blocks=num_res_blocks,
            attention_resolutions=[int(r) for r in attention_resolutions],
            num_classes=num_classes,
            dropout=dropout,
            head_channels=head_channels,
            resblock_updown=resblock_updown,
            positional_encoding=positional_encoding,
            time_embed_dim=time_embed_dim,
        )
        grid = _check_sizes(image_size, patch_size, channel_mult, num_classes)
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.model_channels, self.num_classes = model_channels, num_classes
        self.widths = [int(model_channels * m) for m in channel_mult]
        patched_channels = in_channels * patch_size**2
        self.time_embed_dim = time_embed_dim or self.widths[-1]
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, 4 * model_channels),
            nn.SiLU(),
            nn.Linear(4 * model_channels, self.time_embed_dim),
            nn.SiLU(),
        )
        class_dim = self.widths[0] if num_classes is not None else None
        self.class_embed = (
            nn.Embedding(num_classes + 1, class_dim) if num_classes is not None else None
        )
        self.input_conv = nn.Conv2d(patched_channels, self.widths[0], 3, padding=1)
        use_pe = patch_size > 1 if positional_encoding is None else positional_encoding
        self.register_buffer(
            "pos_enc",
            positional_encoding_2d(self.widths[0], grid, grid) if use_pe else None,
            persistent=False,
        )

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, cout, self.time_embed_dim, dropout, class_dim, **kw)

        def attn(ch: int, side: int) -> AttentionBlock | None:
            return AttentionBlock(ch, head_channels) if side in attention_resolutions else None

        self.down, skip_widths = self._down_path(res, attn, grid, resblock_updown, num_res_blocks)
        ch = self.widths[-1]
        self.middle = nn.ModuleList([res(ch, ch), AttentionBlock(ch, head_channels), res(ch, ch)])
        self.up = self._up_path(
            res,
            attn,
            grid // 2 ** (len(self.widths) - 1),
            resblock_updown,
            num_res_blocks,
            skip_widths,
        )
        self.out_norm = group_norm(self.widths[0])
        self.out_conv = zero_init(nn.Conv2d(self.widths[0], patched_channels, 3, padding=1))
        # The memory layout is not fixed here: it depends on where the network runs
        # (pdm.nn.runtime.place / preferred_memory_format, applied by training and sampling).

    def _down_path(self, res, attn, side: int, resblock_updown: bool, num_res_blocks: int):
        blocks, skip_widths, ch = nn.ModuleList(), [self.widths[0]], self.widths[0]
        for level, width in enumerate(self.widths):
            for _ in range(num_res_blocks):
                blocks.append(_Level(res(ch, width), attn(width, side)))
                ch = width
                skip_widths.append(ch)
            if level != len(self.widths) - 1:
                nxt = self.widths[level + 1]
                down = res(ch, nxt, down=True) if resblock_updown else Downsample(ch, nxt)
                blocks.append(_Level(None, None, down))
                ch, side = nxt, side // 2
                skip_widths.append(ch)
        return blocks, skip_widths

    def _up_path(
        self,
        res,
        attn,
        side: int,
        resblock_updown: bool,
        num_res_blocks: int,
        skip_widths: list[int],
    ):
        blocks, ch = nn.ModuleList(), self.widths[-1]
        for level in reversed(range(len(self.widths))):
            width = self.widths[level]
            for i in range(num_res_blocks + 1):
                up = None
                block_res = res(ch + skip_widths.pop(), width)
                ch = width
                if level and i == num_res_blocks:
                    prev = self.widths[level - 1]
                    up = res(width, prev, up=True) if resblock_updown else Upsample(width, prev)
                blocks.append(_Level(block_res, attn(width, side), up))
                if up is not None:
                    ch, side = self.widths[level - 1], side * 2
        return blocks

    fused_norm = False  # see pdm.nn.runtime.fuse_norms

    def forward(self, x: Tensor, t_label: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from a noisy image.

        Args:
            x: (B, C, H, W) noisy images, H and W divisible by P.
            t_label: (B,) or scalar network time labels (see ``VPSchedule.label``).
            y: (B,) class labels in [0, num_classes]; num_classes is the null label.
               None on a conditional model means "unconditional" (the null label).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        t_label = torch.as_tensor(t_label, device=x.device)
        if t_label.ndim == 0:
            t_label = t_label.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t_label, self.model_channels).to(x.dtype))
        class_emb = self._class_embedding(y, x)
        h = self.input_conv(patchify(x, self.patch_size))
        if self.pos_enc is not None:
            pe = self.pos_enc
            if pe.shape[-2:] != h.shape[-2:]:
                pe = positional_encoding_2d(
                    self.widths[0], h.shape[-2], h.shape[-1], device=h.device
                )
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
        h = group_norm_act(h, self.out_norm) if self.fused_norm else silu_(self.out_norm(h))
        return unpatchify(self.out_conv(h), self.patch_size)

    def _class_embedding(self, y: Tensor | None, x: Tensor) -> Tensor | None:
        if self.class_embed is None:
            if y is not None:
                raise ValueError(
                    "class labels were given to an unconditional model; build it with num_classes"
                )
            return None
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
        return self.class_embed(y)


def _check_sizes(
    image_size: int, patch_size: int, channel_mult: Sequence[float], num_classes: int | None
) -> int:
    """The patched grid side, or a ValueError naming the fix."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    if image_size % patch_size:
        raise ValueError(
            f"image_size={image_size} is not divisible by patch_size={patch_size}; choose a patch size "
            "that divides it"
        )
    grid, levels = image_size // patch_size, len(channel_mult)
    if grid % (2 ** (levels - 1)):
        raise ValueError(
            f"the patched grid side {grid} (= {image_size}/{patch_size}) cannot be halved {levels - 1} "
            f"times for channel_mult={tuple(channel_mult)}; use fewer levels or a smaller patch size"
        )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be positive or None, got {num_classes}")
    return grid
