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
from pdm.nn.runtime import COMPILE_MODES, PRECISIONS, check_compile, precision_dtype
from pdm.outputs import Interrupt, Request, merge_parts, sample_to_folder
from pdm.sampling import METHODS, SOLVERS, AdaptiveSkip, LearnedSchedule, ScheduleFile, Settings
from pdm.sampling.catalog import all_variants, solver_spec
from pdm.sampling.per_image import ESTIMATORS
from pdm.schedule import SKIP_TYPES

DEFAULT = Settings()  # the project's one default sampler
# the flags that are Settings fields
FLAG_FIELDS = ("steps", "solver", "order", "method", "grid", "variant", "estimator", "max_nfe")
VARIANTS = "bh1/bh2 for UniPC, dpmsolver/taylor for DPM-Solver"
SCHEDULE = (
    "replay a calibrate.py schedule file ('embedded': an export's own); --steps N: its budget"
)
OLD_NAMES = {"skip_path": "--schedule", "force_skip_path": "--force-schedule"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    p = parser(__doc__)
    a = p.add_argument_group("the run").add_argument
    a("--ckpt", action="append", help="checkpoint or export; two for a high/low-noise expert pair")
    a("--out", required=True, help="output folder (a run's own; see --overwrite)")
    a(
        "--num-samples",
        type=int,
        default=64,
        help="images to make (default 64); a larger number extends a finished run",
    )
    a("--batch-size", type=int, default=64, help="images per batch (default 64; the same images)")
    a(
        "--shard-size",
        type=int,
        default=None,
        help="images per shard file, the unit kept on Ctrl-C and resumed (default: the folder's "
        "own when resuming, else the batch size, at most 1000)",
    )
    a(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance (default 1.0: none; PDM uses 1.5)",
    )
    a("--labels", type=int, nargs="+", default=None, help="class labels to cycle through")
    a(
        "--split-log-snr",
        type=float,
        default=None,
        help="route two --ckpt at this log SNR (default: where the experts' trained steps meet)",
    )
    a("--seed", type=int, default=0, help="image i's noise comes from (seed, i) (default 0)")
    a("--overwrite", action="store_true", help="discard what --out holds and start afresh")
    a("--progress", action="store_true", help="a progress bar per batch")
    a = p.add_argument_group("the sampler (default: pdm.sampling.Settings())").add_argument
    a("--steps", type=int, default=None, help=f"solver steps (default {DEFAULT.steps})")
    a("--solver", default=None, choices=SOLVERS, help=f"default {DEFAULT.solver}")
    a("--order", type=int, default=None, help="default: the solver's (iPNDM 4, DEIS 3, others 2)")
    a("--method", default=None, choices=METHODS, help=f"default {DEFAULT.method}")
    a("--grid", "--skip-type", dest="grid", default=None, choices=SKIP_TYPES, help="the time grid")
    a(
        "--variant",
        "--solver-type",
        dest="variant",
        default=None,
        choices=all_variants(),
        help=VARIANTS,
    )
    a(
        "--estimator",
        default=None,
        choices=ESTIMATORS,
        help="--method per_image: its error estimate",
    )
    a("--max-nfe", type=int, default=None, help="--method per_image: most evaluations per image")
    a("--denoise-to-zero", action="store_true", help="end with x0 at the last time (one more NFE)")
    a("--thresholding", action="store_true", help="dynamic thresholding of x0 (0.995, max 1)")
    a("--schedule", "--skip-path", dest="schedule", metavar="FILE", help=SCHEDULE)
    a(
        "--force-schedule",
        "--force-skip-path",
        dest="force_schedule",
        action="store_true",
        help="replay a --schedule calibrated for another checkpoint or guidance scale",
    )
    a = p.add_argument_group("adaptive step skipping").add_argument
    a(
        "--skip-threshold",
        type=float,
        default=None,
        help="skip steps where the error stays below this",
    )
    a("--max-skips", type=int, default=None, help="most skips in a row")
    a("--skip-warmup", type=int, default=None, help="first steps that never skip")
    a("--skip-shared", action="store_true", help="one decision per batch (official behaviour)")
    a("--skip-official", action="store_true", help="AdaptiveDiffusion as published")
    a = p.add_argument_group("where and how fast").add_argument
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    a("--precision", default="fp32", choices=PRECISIONS, help="the network's precision")
    a("--compile", action="store_true", help="torch.compile the network (fixed batch shapes)")
    a("--compile-mode", default=None, choices=COMPILE_MODES, help="with --compile")
    a("--num-shards", type=int, default=1, help="split the shards over K invocations ...")
    a("--shard-index", type=int, default=0, help="... this one makes shards i, i+K, i+2K, ...")
    a("--merge", nargs="+", default=None, metavar="PART_DIR", help="join finished parts into --out")
    return p.parse_args(argv)


def chosen_schedule(args: argparse.Namespace) -> LearnedSchedule:
    """The schedule of --schedule FILE for --steps N evaluations (the only one when --steps is not given)."""
    if args.schedule == "embedded":
        if not args.ckpt or len(args.ckpt) != 1:
            raise ValueError(
                "--schedule embedded needs one --ckpt export with schedules in it (python -m "
                "pdm.checkpoints CKPT OUT.safetensors --schedule FILE)"
            )
        found = ScheduleFile.from_export(args.ckpt[0])
    else:
        found = ScheduleFile.load(args.schedule)
    return found.select(args.steps, f"--schedule {args.schedule}")


def build_settings(
    args: argparse.Namespace, given: set[str], learned: LearnedSchedule | None
) -> Settings:
    """The run's :class:`Settings`: the flags over the default sampler, or a learned schedule's own
    (a flag that would change it is refused); a flag that would do nothing is refused too."""
    flags = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None}
    extra = {
        "denoise_to_zero": args.denoise_to_zero,
        "thresholding": args.thresholding,
        "skip": skipping(args, given),
    }
    if learned is not None:
        base = learned.settings
        for name, value in flags.items():
            if name == "grid" and (base.timesteps is not None or learned.grid_points is not None):
                raise ValueError("the schedule carries its own time grid; drop --grid")
            if name != "steps" and value != getattr(base, name):
                raise ValueError(
                    f"--{name} {value} conflicts with the schedule's {getattr(base, name)}; drop it"
                )
        return dataclasses.replace(
            base, **(extra | {"skip": extra["skip"] or base.skip})
        ).resolved()
    if "solver" not in flags and flags.get("method", "multistep") != "multistep":
        # the other methods (singlestep, adaptive, per-image steps) are DPM-Solver's: take its
        # data-prediction form, as `--solver dpmsolver++` would
        flags["solver"] = "dpmsolver++"
    if "estimator" in flags and flags.get("method") != "per_image":
        raise ValueError("--estimator does nothing without --method per_image; drop it")
    settings = Settings(**flags, **extra).resolved()
    spec = solver_spec(settings.solver)
    if spec.first_order and "order" in given:
        raise ValueError(
            f"--order does nothing with --solver {settings.solver} (first order); drop it"
        )
    if args.variant is not None and (not spec.variants or settings.order == 1):
        raise ValueError(
            f"--variant/--solver-type does nothing with --solver {settings.solver} at order "
            f"{settings.order}; drop it"
        )
    return settings


def skipping(args: argparse.Namespace, given: set[str]) -> AdaptiveSkip | None:
    """The adaptive skipping asked for, or None; flags that would do nothing are rejected."""
    tuning = {"max_skips", "skip_warmup", "skip_shared", "skip_official"} & given
    if args.schedule is not None and (args.skip_threshold is not None or tuning):
        raise ValueError(
            "a --schedule fixes where the network runs; drop --skip-threshold and the other skip flags"
        )
    if args.skip_threshold is None:
        if tuning:
            raise ValueError(
                f"--{sorted(tuning)[0].replace('_', '-')} does nothing without --skip-threshold; drop it "
                "or add --skip-threshold"
            )
        return None
    kw = {
        k: v
        for k, v in (("max_skips", args.max_skips), ("warmup", args.skip_warmup))
        if v is not None
    }
    make = AdaptiveSkip.official if args.skip_official else AdaptiveSkip
    return make(args.skip_threshold, per_sample=not args.skip_shared, **kw)


def check_flags(
    args: argparse.Namespace, given: set[str]
) -> tuple[Settings, LearnedSchedule | None, torch.device]:
    """Every check that needs no checkpoint, before anything is loaded or written."""
    if args.num_samples < 1 or args.batch_size < 1 or (args.shard_size or 1) < 1:
        raise ValueError("--num-samples, --batch-size and --shard-size must be positive")
    check_seed(args.seed)
    check_guidance_scale(args.guidance_scale)
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise ValueError(
            f"--shard-index must be in [0, --num-shards), got {args.shard_index} of {args.num_shards}"
        )
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


def request(args: argparse.Namespace) -> Request:
    """The run asked for, besides the sampler settings."""
    mode = (args.compile_mode or "default") if args.compile else None
    return Request(
        args.ckpt,
        Path(args.out),
        args.num_samples,
        args.batch_size,
        args.shard_size or default_shard_size(Path(args.out), args.batch_size),
        args.guidance_scale,
        args.labels,
        args.seed,
        args.precision,
        mode,
        args.num_shards,
        args.shard_index,
        args.overwrite,
        args.progress,
        args.split_log_snr,
    )


def default_shard_size(out: Path, batch_size: int) -> int:
    """The folder's own shard size when it holds a run (so a resume or an extension finds its
    shards), else one batch, at most 1000 images: a stopped run keeps every finished batch."""
    from pdm.outputs.folder import read_identity

    try:
        recorded = (read_identity(out) or {}).get("shard_size")
    except ValueError:
        recorded = None  # an unreadable run.json: the folder check says so
    return int(recorded) if recorded else min(batch_size, 1000)


def main(argv: list[str] | None = None) -> dict:
    """Sample (or merge parts), write the outputs and return the stats."""
    args = parse_args(argv)
    given = given_flags(argv)
    for old in sorted(set(OLD_NAMES) & given):
        print(
            f"sample.py: --{old.replace('_', '-')} is the old name of {OLD_NAMES[old]}",
            file=sys.stderr,
        )
    interrupt = Interrupt()
    previous = signal.signal(signal.SIGINT, interrupt) if _main_thread() else None
    try:
        if not str(args.out).strip():
            raise ValueError("--out is empty; name an output folder")
        if args.merge is not None:
            return merge_parts([Path(p) for p in args.merge], Path(args.out))
        if not args.ckpt:
            raise ValueError("--ckpt is required (or --merge PART_DIR ...)")
        settings, learned, device = check_flags(args, given)
        return sample_to_folder(
            request(args),
            settings,
            learned,
            device,
            interrupt,
            f"--schedule {args.schedule}",
            args.force_schedule,
        )
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


if __name__ == "__main__":
    main()
