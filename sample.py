"""Sample a trained PDM: ``python sample.py --ckpt runs/digits/.../last.ckpt --num-samples 64 --out samples/``.

Writes DIR/grid.png, DIR/samples.npz (arr_0: uint8 NHWC, arr_1: labels when conditional) and
DIR/stats.json. Image i's noise (and label) derive from (seed, i) alone, so the batch size,
an interrupted run or a split across machines never changes the images. Large runs are
written in shards under DIR/shards/; a re-run skips the shards already finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pdm.sampling import METHODS, SOLVERS, AdaptiveSkip
from pdm.schedule import SKIP_TYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint; give two for a high/low-noise expert pair")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard file (resumable unit)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--solver", default="dpmsolver++", choices=SOLVERS)
    p.add_argument("--order", type=int, default=2)
    p.add_argument("--method", default="multistep", choices=METHODS)
    p.add_argument("--skip-type", default="time_uniform", choices=SKIP_TYPES)
    p.add_argument("--solver-type", default=None, choices=["dpmsolver", "taylor", "midpoint", "heun", "bh1", "bh2"])
    p.add_argument("--denoise-to-zero", action="store_true")
    p.add_argument("--thresholding", action="store_true", help="dynamic thresholding of x0 (0.995, max 1)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (PDM: 1.5)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="class labels to cycle through (default: random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-threshold", type=float, default=None, help="adaptive step skipping threshold (e.g. 0.01)")
    p.add_argument("--max-skips", type=int, default=4)
    p.add_argument("--skip-warmup", type=int, default=4)
    p.add_argument("--skip-shared", action="store_true", help="one skip decision per batch (official behaviour)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def noise_and_label(seed: int, index: int, shape: tuple[int, ...], num_classes: int | None,
                    labels: list[int] | None) -> tuple[torch.Tensor, int]:
    """The starting noise and label of image ``index``: a function of (seed, index) only."""
    g = torch.Generator().manual_seed((seed << 32) + index)
    noise = torch.randn(shape, generator=g)
    if num_classes is None:
        return noise, -1
    if labels:
        return noise, labels[index % len(labels)]
    return noise, int(torch.randint(0, num_classes, (1,), generator=g))


def _fail(message: str) -> None:
    print(f"sample.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> dict:
    """Sample, write the outputs and return the stats."""
    args = parse_args(argv)
    from pdm.atomic import atomic_write
    from pdm.checkpoints import load_for_sampling
    from pdm.images import save_grid, to_uint8
    from pdm.sampling import sample

    if args.num_samples < 1 or args.batch_size < 1 or args.shard_size < 1:
        _fail("--num-samples, --batch-size and --shard-size must be positive")
    from pdm.sampling import check_settings

    try:  # solver settings are checked before anything is loaded or written
        check_settings(args.solver, args.method, args.order, args.steps, args.skip_type, "eps", args.solver_type)
        if args.skip_threshold is not None and args.method == "adaptive":
            raise ValueError("--skip-threshold cannot be combined with --method adaptive; use multistep or singlestep")
    except ValueError as e:
        _fail(str(e))
    out = Path(args.out)
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        _fail(f"cannot write to output folder {out}: {e.strerror}; choose another --out")
    try:
        skip = None
        if args.skip_threshold is not None:
            skip = AdaptiveSkip.official(args.skip_threshold, args.max_skips, args.skip_warmup, per_sample=not args.skip_shared)
        loaded = load_for_sampling(args.ckpt, args.guidance_scale, args.device)
    except ValueError as e:
        _fail(str(e))
    if args.labels is not None:
        if loaded.num_classes is None:
            _fail("--labels given for an unconditional model; drop --labels")
        bad = [y for y in args.labels if not 0 <= y < loaded.num_classes]
        if bad:
            _fail(f"class labels {bad} are out of range for {loaded.num_classes} classes (use 0..{loaded.num_classes - 1})")
    shape = (loaded.in_channels, loaded.image_size, loaded.image_size)
    settings = {k: v for k, v in vars(args).items() if k not in ("progress",)}
    num_shards = (args.num_samples + args.shard_size - 1) // args.shard_size
    sample_seconds, nfe_sum, images_done, evaluated_masks = 0.0, 0.0, 0, []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for k in range(num_shards):
        shard_path = out / "shards" / f"shard_{k:05d}.npz"
        start, stop = k * args.shard_size, min((k + 1) * args.shard_size, args.num_samples)
        if shard_path.exists():
            continue  # finished by an earlier run
        images, labels, nfes = [], [], []
        for b0 in range(start, stop, args.batch_size):
            idx = range(b0, min(b0 + args.batch_size, stop))
            pairs = [noise_and_label(args.seed, i, shape, loaded.num_classes, args.labels) for i in idx]
            noise = torch.stack([p[0] for p in pairs]).to(args.device)
            kwargs = {}
            if loaded.num_classes is not None:
                kwargs["y"] = torch.tensor([p[1] for p in pairs], device=args.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                res = sample(loaded.model_fn, noise, loaded.schedule, steps=args.steps, solver=args.solver,
                             order=args.order, method=args.method, skip_type=args.skip_type,
                             prediction=loaded.prediction, denoise_to_zero=args.denoise_to_zero, skip=skip,
                             solver_type=args.solver_type, thresholding=args.thresholding, model_kwargs=kwargs,
                             progress=args.progress)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            sample_seconds += time.perf_counter() - t0
            images.append(to_uint8(res.x))
            labels += [p[1] for p in pairs]
            nfes.append(res.nfe_per_sample.cpu().numpy())
            evaluated_masks.append(res.evaluated.cpu().numpy().T.tolist())
            nfe_sum += float(res.nfe_per_sample.sum())
            images_done += len(idx)
            print(f"images {b0 + len(idx)}/{args.num_samples}  nfe {res.nfe:.2f}", file=sys.stderr, flush=True)
        arrays = {"images": np.concatenate(images), "labels": np.asarray(labels, dtype=np.int64),
                  "nfe": np.concatenate(nfes)}
        atomic_write(shard_path, lambda tmp, a=arrays: np.savez(open(tmp, "wb"), **a))
    shards = [np.load(out / "shards" / f"shard_{k:05d}.npz") for k in range(num_shards)]
    all_images = np.concatenate([s["images"] for s in shards])
    all_labels = np.concatenate([s["labels"] for s in shards])
    all_nfe = np.concatenate([s["nfe"] for s in shards])
    arrays = {"arr_0": all_images}
    if loaded.num_classes is not None:
        arrays["arr_1"] = all_labels
    atomic_write(out / "samples.npz", lambda tmp: np.savez(open(tmp, "wb"), **arrays))
    save_grid(all_images[:64], out / "grid.png", scale=2 if loaded.image_size <= 64 else 1)
    stats = {
        "nfe": float(all_nfe.mean()),
        "seconds": sample_seconds,
        "images_per_second": images_done / sample_seconds if sample_seconds > 0 else None,
        "images_sampled_this_run": images_done,
        "num_samples": int(all_images.shape[0]),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "device": str(args.device),
        "settings": settings,
        "model": loaded.config,
    }
    if skip is not None:
        stats["evaluated"] = [m for batch in evaluated_masks for m in batch]  # per image, per step
    atomic_write(out / "stats.json", lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=1, default=str)))
    print(json.dumps({k: stats[k] for k in ("nfe", "seconds", "images_per_second", "num_samples")}))
    return stats


if __name__ == "__main__":
    main()
