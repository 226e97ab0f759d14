"""PDM U-Net tools.

    python -m pdm.nn --patch-size 4                      # build one, run a patched forward pass

(Official weights convert with ``python -m pdm.checkpoints convert``: checkpoints sit below the
network in the house, so the command that needs both lives there.)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from pdm.nn import UNet


def main(argv: list[str] | None = None) -> None:
    """Print the parameter count, the patched grid and the latency of one forward pass."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m pdm.nn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--model-channels", type=int, default=64)
    p.add_argument("--channel-mult", type=float, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    try:
        net = UNet(
            image_size=args.image_size,
            patch_size=args.patch_size,
            model_channels=args.model_channels,
            channel_mult=tuple(args.channel_mult),
            attention_resolutions=(16, 8),
        ).eval()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    with torch.no_grad():
        start = time.perf_counter()
        out = net(x, torch.full((args.batch_size,), 500.0))
        seconds = time.perf_counter() - start
    grid = args.image_size // args.patch_size
    params = sum(p.numel() for p in net.parameters())
    print(
        f"UNet P={args.patch_size}: {params / 1e6:.2f}M parameters, grid {grid}x{grid}x{3 * args.patch_size**2}, "
        f"output {tuple(out.shape)}, {seconds * 1e3:.1f} ms for {args.batch_size} images"
    )


if __name__ == "__main__":
    main()
