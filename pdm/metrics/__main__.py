"""Evaluation commands.

    python -m pdm.metrics ref-stats --images DATA --out ref.npz [--image-size N] [--feature inception|digits]
    python -m pdm.metrics fid --images samples.npz --ref ref.npz [--feature inception|digits]
    python -m pdm.metrics digits-fd --images samples.npz   # + classifier accuracy when arr_1 holds labels
    python -m pdm.metrics paired --images samples.npz --ref full_steps.npz [--lpips]

DATA is a samples.npz (arr_0, uint8 NHWC), an image folder, or ``digits`` (the embedded set);
ref-stats also reads what the data/prepare_*.py scripts write (a saved Hugging Face dataset such
as data/cifar10, its --split; an LMDB such as data/lsun/church_outdoor_train_lmdb), with
--image-size N centre-cropping every image as training does (needed for ImageNet and LSUN).
Reported FIDs should use 50,000 samples against the training set's statistics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _images(spec: str, min_images: int = 2) -> np.ndarray:
    from pdm.metrics import digits_reference_images, load_images

    return digits_reference_images().numpy() if spec == "digits" else load_images(spec, min_images)


def _reference(args):
    """ref-stats' images: the digits, or batches from any source :mod:`pdm.metrics.sources` reads."""
    from pdm.metrics.sources import reference_batches

    if args.images == "digits":
        return _images("digits")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be positive, got {args.image_size}")
    count, chunks = reference_batches(args.images, args.image_size, args.split)
    if count < 2:
        raise ValueError(
            f"{args.images} holds {count} images; reference statistics need at least 2"
        )
    return chunks


def _labels(spec: str) -> np.ndarray | None:
    """arr_1 of a samples.npz (or of a sample.py output folder's), if it has one."""
    if (Path(spec) / "samples.npz").is_file() and (Path(spec) / "run.json").is_file():
        spec = str(Path(spec) / "samples.npz")
    if not spec.endswith(".npz"):
        return None
    with np.load(spec, allow_pickle=False) as z:
        return z["arr_1"] if "arr_1" in z else None


def _metric(feature: str, weights: str | None):
    from pdm.metrics import digits_fd_metric, make_fid

    return digits_fd_metric() if feature == "digits" else make_fid(inception_weights=weights)


def parse_args(argv: list[str] | None = None):
    """The subcommands and their flags."""
    from pdm.cli import parser

    p = parser(__doc__, prog="python -m pdm.metrics")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("ref-stats", "fid", "digits-fd", "paired"):
        s = sub.add_parser(name, allow_abbrev=False)
        s.add_argument("--images", required=True)
        if name in ("fid", "paired"):
            s.add_argument("--ref", required=True)
        if name == "ref-stats":
            s.add_argument("--out", required=True)
            s.add_argument(
                "--image-size",
                type=int,
                default=None,
                help="centre-crop every image to N x N as training does (the config's image_size)",
            )
            s.add_argument(
                "--split", default="train", help="the split of a saved Hugging Face dataset"
            )
        if name in ("ref-stats", "fid"):
            s.add_argument("--feature", choices=["inception", "digits"], default="inception")
            s.add_argument("--inception-weights", default=None)
        if name == "paired":
            s.add_argument("--lpips", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run one evaluation command and print its result as JSON."""
    args = parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except ValueError as e:
        print(f"python -m pdm.metrics: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result))
    return result


def _ref_stats(args) -> dict:
    from pdm.metrics import compute_stats

    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name such as ref.npz")
    stats = compute_stats(_metric(args.feature, args.inception_weights), _reference(args))
    stats.save(args.out)
    return {"out": args.out, "n": stats.n, "dims": int(stats.mu.shape[0])}


def _fid(args) -> dict:
    from pdm.metrics import DEFAULT_NUM_SAMPLES, FeatureStats, fid_against

    images = _images(args.images)
    value = fid_against(
        _metric(args.feature, args.inception_weights), FeatureStats.load(args.ref), images
    )
    result = {"fid": value, "num_images": len(images), "feature": args.feature}
    if len(images) < DEFAULT_NUM_SAMPLES and args.feature == "inception":
        result["note"] = "fewer than 50,000 images: FID is biased upward; report 50k-sample numbers"
    return result


def _digits_fd(args) -> dict:
    from pdm.metrics import classifier_accuracy, digits_fd_baseline, digits_fd_metric, fid_against

    images = _images(args.images)
    stats, baseline = digits_fd_baseline(len(images))
    fd = fid_against(digits_fd_metric(), stats, images)
    result = {
        "fd8x8": fd,
        "real_vs_real_fd8x8": baseline,
        "num_images": len(images),
        "fd_ratio_to_floor": fd / baseline,
    }
    labels = _labels(args.images)
    if labels is not None:
        result["classifier_accuracy"] = classifier_accuracy(images, labels)
    return result


def _paired(args) -> dict:
    from pdm.metrics import paired_quality

    return paired_quality(_images(args.images, 1), _images(args.ref, 1), lpips=args.lpips)


COMMANDS = {"ref-stats": _ref_stats, "fid": _fid, "digits-fd": _digits_fd, "paired": _paired}


if __name__ == "__main__":
    main()
