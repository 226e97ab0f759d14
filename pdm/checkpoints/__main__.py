"""Checkpoint commands: export a training checkpoint's EMA weights, or convert official weights.

    python -m pdm.checkpoints CKPT OUT.safetensors [--schedule FILE] [--overwrite]
    python -m pdm.checkpoints convert OFFICIAL.pt OUT.safetensors --config configs/lsun_church_p4.yaml

Both write a safetensors file with the model's config as metadata, which ``sample.py --ckpt``
reads. Neither writes over its input, or over an existing file without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys

from pdm.atomic import WriteError
from pdm.checkpoints.writing import export_official, export_safetensors
from pdm.cli import EXIT_INTERRUPTED, fail, parser


def convert(argv: list[str]) -> None:
    """``convert OFFICIAL.pt OUT.safetensors --config CONFIG``: official weights -> a pdm export."""
    p = parser(convert.__doc__, prog="python -m pdm.checkpoints convert")
    p.add_argument("official", help="an official PatchDiffusion-Pytorch state dict (.pt)")
    p.add_argument("out", help="the .safetensors file to write (sample.py --ckpt reads it)")
    p.add_argument(
        "--config",
        required=True,
        help="the pdm config of the same network, e.g. configs/lsun_church_p4.yaml",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    try:
        print(export_official(args.official, args.config, args.out, args.overwrite))
    except (ValueError, WriteError) as e:
        fail("python -m pdm.checkpoints convert", str(e))


def main(argv: list[str] | None = None) -> None:
    """``python -m pdm.checkpoints CKPT OUT.safetensors``: export EMA weights for sample.py
    (``convert ...``: official weights, see the module's help)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        return convert(argv[1:])
    p = parser(__doc__, prog="python -m pdm.checkpoints")
    p.usage = (
        "python -m pdm.checkpoints CKPT OUT.safetensors [--schedule FILE [--force]] [--overwrite]\n"
        "       python -m pdm.checkpoints convert OFFICIAL.pt OUT.safetensors --config CONFIG "
        "[--overwrite]"
    )
    p.add_argument("ckpt", help="a training checkpoint (.ckpt) written by train.py")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--schedule",
        metavar="FILE",
        default=None,
        help="embed a calibrate.py schedule file (sample.py --schedule embedded replays it)",
    )
    p.add_argument("--skip-paths", dest="schedule", help=argparse.SUPPRESS)  # the old name
    p.add_argument(
        "--force", action="store_true", help="embed a --schedule calibrated for another checkpoint"
    )
    args = p.parse_args(argv)
    if args.force and args.schedule is None:
        fail("python -m pdm.checkpoints", "--force does nothing without --schedule; drop it")
    try:
        print(export_safetensors(args.ckpt, args.out, args.overwrite, args.schedule, args.force))
    except (ValueError, WriteError) as e:
        fail("python -m pdm.checkpoints", str(e))
    except KeyboardInterrupt:  # the export is written atomically: nothing half-written is left
        fail(
            "python -m pdm.checkpoints",
            f"interrupted; {args.out} was not written",
            EXIT_INTERRUPTED,
        )


if __name__ == "__main__":
    main()
