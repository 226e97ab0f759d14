"""Sample a trained PDM: ``python sample.py --ckpt runs/digits/checkpoints/last.ckpt --num-samples 64 --out DIR``.

Writes DIR/grid.png, DIR/samples.npz (arr_0: uint8 NHWC, arr_1: labels when conditional),
DIR/stats.json and DIR/run.json. Image i's noise (and label) derive from (seed, i) alone, so the
batch size, an interrupted run or a split across machines never changes the images.

Images are made in shards of --shard-size under DIR/shards/. run.json records what produced
them (checkpoint hashes, the sampler settings, the sampling code's fingerprint): re-running the
same command resumes, skipping finished shards; other settings stop with exit code 2 unless
--overwrite starts afresh. --num-shards K --shard-index i makes only the shards i, i+K, i+2K, ...
(one machine's part); --merge PART_DIR ... --out DIR joins parts whose run.json agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

import torch

from pdm.atomic import WriteError
from pdm.cli import (
    EXIT_INTERRUPTED,
    check_guidance_scale,
    check_seed,
    fail,
    given_flags,
    parse_device,
    parser,
)
from pdm.launch import Launch, detect
from pdm.nn.runtime import COMPILE_MODES, PRECISIONS, check_compile, precision_dtype
from pdm.sampling import METHODS, SOLVERS, AdaptiveSkip, LearnedSchedule, ScheduleFile, Settings
from pdm.sampling.catalog import SOLVER_TABLE, all_variants, solver_spec
from pdm.schedule import SKIP_TYPES

DEFAULT = Settings()  # the project's one default sampler
FLAG_FIELDS = ("steps", "solver", "order", "method", "grid", "variant")  # flags that are Settings fields
OLD_NAMES = {"skip_path": "--schedule", "force_skip_path": "--force-schedule"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    p = parser(__doc__)
    p.add_argument("--ckpt", action="append", help="checkpoint or export; give two for a high/low-noise expert pair")
    p.add_argument("--out", required=True, help="output folder (a run's own; see --overwrite)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="images per network batch (does not change the images)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard file (the resumable unit)")
    p.add_argument("--steps", type=int, default=None, help=f"solver steps (default {DEFAULT.steps})")
    p.add_argument("--solver", default=None, choices=SOLVERS,
                   help=f"default {DEFAULT.solver}; " + "; ".join(f"{k}: {v.summary}" for k, v in SOLVER_TABLE.items()))
    p.add_argument("--order", type=int, default=None, help="solver order (default: "
                   + ", ".join(f"{k} {v.default_order}" for k, v in SOLVER_TABLE.items() if not v.first_order) + ")")
    p.add_argument("--method", default=None, choices=METHODS, help=f"default {DEFAULT.method}")
    p.add_argument("--grid", "--skip-type", dest="grid", default=None, choices=SKIP_TYPES,
                   help=f"the time grid (default {DEFAULT.grid}); --skip-type is DPM-Solver's name for it")
    p.add_argument("--variant", "--solver-type", dest="variant", default=None, choices=all_variants(),
                   help="; ".join(f"{k}: {', '.join(v.variants)}" for k, v in SOLVER_TABLE.items() if v.variants))
    p.add_argument("--denoise-to-zero", action="store_true", help="end with x0 at the last time (one more NFE)")
    p.add_argument("--thresholding", action="store_true", help="dynamic thresholding of x0 (0.995, max 1)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (PDM: 1.5)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="class labels to cycle through (default: random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-threshold", type=float, default=None, help="adaptive step skipping: its threshold")
    p.add_argument("--max-skips", type=int, default=None, help="with --skip-threshold: most skips in a row")
    p.add_argument("--skip-warmup", type=int, default=None, help="with --skip-threshold: steps that never skip")
    p.add_argument("--skip-shared", action="store_true", help="one skip decision per batch (official behaviour)")
    p.add_argument("--skip-official", action="store_true", help="AdaptiveDiffusion as published (latent test, reuse)")
    p.add_argument("--schedule", "--skip-path", dest="schedule", default=None, metavar="FILE",
                   help="replay a schedule file of calibrate.py (it fixes the solver settings), or 'embedded' (the "
                        "schedules inside a --ckpt export); --steps N picks the schedule of N evaluations")
    p.add_argument("--force-schedule", "--force-skip-path", dest="force_schedule", action="store_true",
                   help="replay a --schedule calibrated for another checkpoint or guidance scale")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available; under "
                   "torchrun/srun each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="the network's precision (solver arithmetic stays fp32); bf16/fp16 change pixels slightly")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (fixed batch shapes)")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="with --compile: reduce-overhead adds CUDA graphs; max-autotune searches kernels")
    p.add_argument("--num-shards", type=int, default=1, help="split the shards over K invocations ...")
    p.add_argument("--shard-index", type=int, default=0, help="... this one makes shards i, i+K, i+2K, ...")
    p.add_argument("--merge", nargs="+", default=None, metavar="PART_DIR", help="join finished parts into --out")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds and start afresh")
    p.add_argument("--progress", action="store_true", help="a progress bar per batch")
    return p.parse_args(argv)


def chosen_schedule(args: argparse.Namespace) -> LearnedSchedule:
    """The schedule of --schedule FILE for --steps N evaluations (the only one when --steps is not given)."""
    if args.schedule == "embedded":
        if not args.ckpt or len(args.ckpt) != 1:
            raise ValueError("--schedule embedded needs one --ckpt export with schedules in it (python -m "
                             "pdm.checkpoints CKPT OUT.safetensors --schedule FILE)")
        found = ScheduleFile.from_export(args.ckpt[0])
    else:
        found = ScheduleFile.load(args.schedule)
    return found.select(args.steps, f"--schedule {args.schedule}")


def build_settings(args: argparse.Namespace, given: set[str], learned: LearnedSchedule | None) -> Settings:
    """The run's :class:`Settings`: the flags over the default sampler, or a learned schedule's own
    (a flag that would change it is refused); a flag that would do nothing is refused too."""
    flags = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None}
    extra = {"denoise_to_zero": args.denoise_to_zero, "thresholding": args.thresholding, "skip": skipping(args, given)}
    if learned is not None:
        base = learned.settings
        for name, value in flags.items():
            if name == "grid" and (base.timesteps is not None or learned.grid_points is not None):
                raise ValueError("the schedule carries its own time grid; drop --grid")
            if name != "steps" and value != getattr(base, name):
                raise ValueError(f"--{name} {value} conflicts with the schedule's {getattr(base, name)}; drop it")
        return dataclasses.replace(base, **(extra | {"skip": extra["skip"] or base.skip})).resolved()
    if "solver" not in flags and flags.get("method", "multistep") != "multistep":
        raise ValueError(f"--method {flags['method']} is a DPM-Solver method and the default solver is "
                         f"{DEFAULT.solver}; add --solver dpmsolver++ (or dpmsolver)")
    settings = Settings(**flags, **extra).resolved()
    spec = solver_spec(settings.solver)
    if spec.first_order and "order" in given:
        raise ValueError(f"--order does nothing with --solver {settings.solver} (first order); drop it")
    if args.variant is not None and (not spec.variants or settings.order == 1):
        raise ValueError(f"--variant/--solver-type does nothing with --solver {settings.solver} at order "
                         f"{settings.order}; drop it")
    return settings


def skipping(args: argparse.Namespace, given: set[str]) -> AdaptiveSkip | None:
    """The adaptive skipping asked for, or None; flags that would do nothing are rejected."""
    tuning = {"max_skips", "skip_warmup", "skip_shared", "skip_official"} & given
    if args.schedule is not None and (args.skip_threshold is not None or tuning):
        raise ValueError("a --schedule fixes where the network runs; drop --skip-threshold and the other skip flags")
    if args.skip_threshold is None:
        if tuning:
            raise ValueError(f"--{sorted(tuning)[0].replace('_', '-')} does nothing without --skip-threshold; drop it "
                             "or add --skip-threshold")
        return None
    kw = {k: v for k, v in (("max_skips", args.max_skips), ("warmup", args.skip_warmup)) if v is not None}
    make = AdaptiveSkip.official if args.skip_official else AdaptiveSkip
    return make(args.skip_threshold, per_sample=not args.skip_shared, **kw)


def check_flags(args: argparse.Namespace, given: set[str]) -> tuple[Settings, LearnedSchedule | None, torch.device]:
    """Every check that needs no checkpoint, before anything is loaded or written."""
    if not str(args.out).strip():
        raise ValueError("--out is empty; name an output folder")
    if args.num_samples < 1 or args.batch_size < 1 or args.shard_size < 1:
        raise ValueError("--num-samples, --batch-size and --shard-size must be positive")
    check_seed(args.seed)
    check_guidance_scale(args.guidance_scale)
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard-index must be in [0, --num-shards), got {args.shard_index} of {args.num_shards}")
    if args.force_schedule and args.schedule is None:
        raise ValueError("--force-schedule does nothing without --schedule; drop it")
    if args.compile_mode is not None and not args.compile:
        raise ValueError("--compile-mode does nothing without --compile; add --compile or drop it")
    learned = chosen_schedule(args) if args.schedule is not None else None
    settings = build_settings(args, given, learned)
    device = parse_device(args.device)
    precision_dtype(args.precision, device)
    if args.compile:
        check_compile(args.precision, device)
    return settings, learned, device


def run_identity(args: argparse.Namespace, settings: Settings, ckpt_hashes: list[str]) -> dict:
    """Everything that decides which images land in the shards (see :mod:`pdm.outputs`)."""
    from pdm import __version__
    from pdm.outputs import code_fingerprint

    run = {"guidance_scale": args.guidance_scale, "labels": args.labels, "seed": args.seed,
           "precision": args.precision, "compile": (args.compile_mode or "default") if args.compile else None}
    return {"pdm_version": __version__, "code": code_fingerprint(), "checkpoints": sorted(ckpt_hashes),
            "settings": {**settings.record(), **run}, "num_samples": args.num_samples, "shard_size": args.shard_size}


def main(argv: list[str] | None = None) -> dict:
    """Sample (or merge parts), write the outputs and return the stats."""
    from pdm.outputs import Interrupt

    args = parse_args(argv)
    given = given_flags(argv)
    for old in sorted(set(OLD_NAMES) & given):
        print(f"sample.py: --{old.replace('_', '-')} is the old name of {OLD_NAMES[old]}", file=sys.stderr)
    interrupt = Interrupt()
    previous = signal.signal(signal.SIGINT, interrupt) if _main_thread() else None
    try:
        if args.merge is not None:
            from pdm.outputs import merge_parts

            if not str(args.out).strip():
                raise ValueError("--out is empty; name an output folder")
            return merge_parts([Path(p) for p in args.merge], Path(args.out))
        if not args.ckpt:
            raise ValueError("--ckpt is required (or --merge PART_DIR ...)")
        settings, learned, device = check_flags(args, given)
        return sample_run(args, settings, learned, device, interrupt)
    except (ValueError, WriteError) as e:
        fail("sample.py", str(e))
    except KeyboardInterrupt:
        fail("sample.py", interrupt.kept(args.out), EXIT_INTERRUPTED)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    raise AssertionError("unreachable")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def sample_run(args: argparse.Namespace, settings: Settings, learned: LearnedSchedule | None, device: torch.device,
               interrupt=None) -> dict:
    """Load the model, make this invocation's shards and, once all exist, the final outputs.

    Under torchrun or srun every rank runs this: rank 0 prepares the folder, the shards still
    missing are dealt out round-robin, and rank 0 writes the final files when all ranks are done.
    """
    from pdm.outputs import Interrupt

    launch = detect()
    device = launch.device(device)
    launch.start(device)
    try:
        return _sample_shards(args, settings, learned, device, launch, interrupt or Interrupt())
    finally:
        launch.stop()


def _sample_shards(args: argparse.Namespace, settings: Settings, learned: LearnedSchedule | None,
                   device: torch.device, launch: Launch, interrupt) -> dict:
    from pdm.checkpoints import load_for_sampling
    from pdm.outputs import Run, file_sha256, write_outputs

    loaded = load_for_sampling(args.ckpt, args.guidance_scale, device, args.precision,
                               (args.compile_mode or "default") if args.compile else None, args.batch_size)
    if args.labels is not None:
        if loaded.num_classes is None:
            raise ValueError("--labels given for an unconditional model; drop --labels")
        bad = [y for y in args.labels if not 0 <= y < loaded.num_classes]
        if bad:
            raise ValueError(f"class labels {bad} are out of range for {loaded.num_classes} classes "
                             f"(use 0..{loaded.num_classes - 1})")
    hashes = [file_sha256(p) for p in args.ckpt]
    if learned is not None:
        if not args.force_schedule:  # embedded schedules travel with their weights: only the scale can be wrong
            made = learned.calibrated_for.get("checkpoints") if args.schedule == "embedded" else None
            learned.check_calibrated_for(made or hashes, args.guidance_scale, [str(p) for p in args.ckpt],
                                         f"--schedule {args.schedule}")
        settings = dataclasses.replace(learned.settings_for(loaded.schedule), skip=settings.skip,
                                       denoise_to_zero=settings.denoise_to_zero, thresholding=settings.thresholding)
    run = Run(Path(args.out), args.num_samples, args.shard_size, args.num_shards, args.shard_index, launch)
    run.claim(run_identity(args, settings, hashes), args.overwrite, [str(c) for c in args.ckpt],
              {"device": str(device), "batch_size": args.batch_size, "torch": torch.__version__,
               "processes": launch.world_size, "model": loaded.config, "ckpt": list(args.ckpt)})
    interrupt.run = run
    shape = (loaded.in_channels, loaded.image_size, loaded.image_size)
    done = run.make(_batch(loaded, settings, args, interrupt.check), shape, loaded.num_classes, args.seed,
                    args.labels, args.batch_size, device)
    missing = run.missing()
    if missing:
        return {"images_sampled_this_run": done, "shards_missing": missing}
    if launch.rank != 0:
        return {"images_sampled_this_run": done, "written_by_rank": 0}
    return write_outputs(run.out, run.paths, loaded.num_classes is not None, loaded.image_size, done,
                         settings.skip is not None)


def _batch(loaded, settings: Settings, args: argparse.Namespace, check_interrupt):
    """``batch(noise, model_kwargs)``: sample one batch, refusing non-finite images."""
    from pdm.sampling import sample

    def batch(noise: torch.Tensor, model_kwargs: dict):
        check_interrupt()
        res = sample(loaded.model_fn, noise, loaded.schedule, settings, prediction=loaded.prediction,
                     model_kwargs=model_kwargs, progress=args.progress)
        if not bool(torch.isfinite(res.x).all()):  # one read-back per batch, none per step
            hint = ("fp16 overflowed; use --precision bf16 (same speed on recent GPUs, fp32's range)"
                    if args.precision == "fp16" else "the checkpoint may be broken (NaN weights?)")
            raise ValueError(f"sampling produced non-finite values: {hint}")
        return res

    return batch


if __name__ == "__main__":
    main()
