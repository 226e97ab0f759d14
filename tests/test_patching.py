"""patchify / unpatchify against an explicit pixel loop, and the 2-D positional encoding."""

import math

import pytest
import torch

from pdm.patching import patchify, positional_encoding_2d, unpatchify


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_patchify_matches_explicit_pixel_loop(patch_size):
    torch.manual_seed(0)
    B, C, H, W, P = 2, 3, 8, 12, patch_size
    x = torch.randn(B, C, H, W)
    y = patchify(x, P)
    ref = torch.empty(B, C * P * P, H // P, W // P)
    for i in range(H // P):
        for j in range(W // P):
            for dy in range(P):
                for dx in range(P):
                    for c in range(C):
                        ref[:, (dy * P + dx) * C + c, i, j] = x[:, c, i * P + dy, j * P + dx]
    assert torch.equal(y, ref)


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_unpatchify_inverts_patchify_exactly(patch_size):
    x = torch.randn(3, 3, 32, 16, dtype=torch.float64)
    y = patchify(x, patch_size)
    assert y.shape == (3, 3 * patch_size**2, 32 // patch_size, 16 // patch_size)
    assert torch.equal(unpatchify(y, patch_size), x)


def test_channel_order_differs_from_pixel_unshuffle():
    x = torch.randn(1, 3, 4, 4)
    ours = patchify(x, 2)
    theirs = torch.nn.functional.pixel_unshuffle(x, 2)  # (c p q) order
    assert not torch.equal(ours, theirs)
    assert torch.equal(ours[:, 0:3], theirs[:, 0::4])  # (dy, dx) = (0, 0) for the 3 colours


def test_patchify_rejects_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        patchify(torch.zeros(1, 3, 30, 32), 4)


def test_positional_encoding_halves_encode_x_then_y():
    pe = positional_encoding_2d(16, height=5, width=7, dtype=torch.float64)
    assert pe.shape == (16, 5, 7)
    x_half, y_half = pe[:8], pe[8:]
    assert torch.equal(x_half, x_half[:, :1, :].expand_as(x_half))  # constant down a column
    assert torch.equal(y_half, y_half[:, :, :1].expand_as(y_half))  # constant along a row
    # PDM's encoding: channel i of a half is sin(pos * f_i * 64 / n), f_i = 10000^(-i/7), n the axis length
    col, row = 3, 2
    for i in range(8):
        f = 10000 ** (-i / 7)
        assert pe[i, 0, col].item() == pytest.approx(math.sin(col * f * 64 / 7), abs=1e-12)
        assert pe[8 + i, row, 0].item() == pytest.approx(math.sin(row * f * 64 / 5), abs=1e-12)


def test_positional_encoding_positions_are_distinct():
    pe = positional_encoding_2d(64, 8, 8).flatten(1).T  # (64 positions, 64 channels)
    dists = torch.cdist(pe, pe) + torch.eye(64) * 1e3
    assert dists.min() > 0.1
