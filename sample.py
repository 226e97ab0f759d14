"""Sample a trained PDM: ``python sample.py --ckpt runs/digits/checkpoints/last.ckpt --num-samples 64 --out samples/``.

Writes DIR/grid.png, DIR/samples.npz (arr_0: uint8 NHWC, arr_1: labels when conditional),
DIR/stats.json and DIR/run.json. Image i's noise (and label) derive from (seed, i) alone, so the
batch size, an interrupted run or a split across machines never changes the images.

Images are made in shards of --shard-size under DIR/shards/. run.json records what produced
them (checkpoint hashes, every setting that changes pixels, the sampling code's fingerprint):
re-running the same command resumes, skipping finished shards; other settings stop with exit
code 2 unless --overwrite starts afresh. --num-shards K --shard-index i makes only the shards
i, i+K, i+2K, ... (one machine's part); --merge PART_DIR ... --out DIR joins parts whose
run.json agree.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from pdm.atomic import WriteError
from pdm.cli import EXIT_INTERRUPTED, check_guidance_scale, check_seed, fail, given_flags, parse_device, parser
from pdm.launch import Launch, detect
from pdm.nn.runtime import COMPILE_MODES, PRECISIONS, check_compile, precision_dtype
from pdm.sampling import METHODS, SOLVERS, AdaptiveSkip, SkipPath, check_settings
from pdm.sampling.catalog import SOLVER_TABLE, all_variants, solver_spec
from pdm.schedule import SKIP_TYPES

# The defaults: the most accurate 20-step setting of benchmarks/solver_accuracy.py on both models
# (iPNDM-4 on logSNR: 2.4e-3 RMS on digits, where the first round's DPM-Solver++(2M) on
# time_uniform had 2.7e-2). Runs made with other settings keep them in their run.json.
DEFAULT_SOLVER, DEFAULT_SKIP_TYPE = "ipndm", "logSNR"  # each solver's default order: its catalog row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    p = parser(__doc__)
    p.add_argument("--ckpt", action="append", help="checkpoint or export; give two for a high/low-noise expert pair")
    p.add_argument("--out", required=True, help="output folder (a run's own; see --overwrite)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="images per network batch (does not change the images)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard file (the resumable unit)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default 20)")
    p.add_argument("--solver", default=None, choices=SOLVERS,
                   help=f"default {DEFAULT_SOLVER} (most accurate at 20 NFE here); "
                        + "; ".join(f"{k}: {v.summary}" for k, v in SOLVER_TABLE.items()))
    p.add_argument("--order", type=int, default=None, help="solver order (default: "
                   + ", ".join(f"{k} {v.default_order}" for k, v in SOLVER_TABLE.items() if not v.first_order) + ")")
    p.add_argument("--method", default=None, choices=METHODS, help="default multistep")
    p.add_argument("--skip-type", default=None, choices=SKIP_TYPES, help="time grid (default logSNR)")
    p.add_argument("--solver-type", default=None, choices=all_variants(),
                   help="; ".join(f"{k}: {', '.join(v.variants)}" for k, v in SOLVER_TABLE.items() if v.variants))
    p.add_argument("--denoise-to-zero", action="store_true")
    p.add_argument("--thresholding", action="store_true", help="dynamic thresholding of x0 (0.995, max 1)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (PDM: 1.5)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="class labels to cycle through (default: random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-threshold", type=float, default=None, help="adaptive step skipping: its threshold")
    p.add_argument("--max-skips", type=int, default=None)
    p.add_argument("--skip-warmup", type=int, default=None)
    p.add_argument("--skip-shared", action="store_true", help="one skip decision per batch (official behaviour)")
    p.add_argument("--skip-official", action="store_true", help="AdaptiveDiffusion as published (latent test, reuse)")
    p.add_argument("--skip-path", default=None,
                   help="replay a path file of calibrate.py (it fixes the solver settings), or 'embedded' (the "
                        "paths inside a --ckpt export); --steps N picks the path of N evaluations")
    p.add_argument("--force-skip-path", action="store_true",
                   help="replay a --skip-path calibrated for another checkpoint or guidance scale")
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


class _Interrupt:
    """SIGINT handling that cannot be lost: the handler records the interrupt before raising
    KeyboardInterrupt, and every batch checks the record. (Python swallows an exception raised
    while a finalizer runs, so a bare handler would let such a Ctrl-C pass unnoticed.) It also
    knows this run's shards once they are claimed, so the exit message can say what was kept."""

    def __init__(self) -> None:
        self.seen = False
        self.paths: list[Path] | None = None  # this invocation's shard files, once claimed
        self.made = 0  # shards this invocation finished

    def __call__(self, signum: int, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if an interrupt arrived (even one swallowed on the way)."""
        if self.seen:
            raise KeyboardInterrupt

    def kept(self, out: str) -> str:
        """What an interrupted run leaves in ``out``, in words."""
        from pdm.outputs import is_recorded

        if self.paths is None:
            return "interrupted before any image was made; nothing was written"
        done = sum(map(is_recorded, self.paths))
        if done == 0:
            return f"interrupted before the first shard was finished; no images kept in {out}"
        return (f"interrupted; {done} of {len(self.paths)} shards are finished in {out} ({self.made} made by this run); "
                "re-run the same command to resume")


def resolve_settings(args: argparse.Namespace, given: set[str], path: SkipPath | None = None) -> dict:
    """The solver settings of the run, from the flags (or a skip path), with every flag that
    would do nothing in its context rejected. Raises ValueError naming the fix."""
    s = {"steps": args.steps, "solver": args.solver, "order": args.order, "method": args.method,
         "skip_type": args.skip_type, "solver_type": args.solver_type}
    timesteps = None
    if path is not None:  # --skip-path: its path for --steps N evaluations
        timesteps = path.settings.get("timesteps")
        if timesteps is not None and args.skip_type is not None:
            raise ValueError("the skip path carries its own calibrated time grid; drop --skip-type")
        for key, value in path.settings.items():
            if key in s and key != "steps":
                if s[key] is not None and s[key] != value:
                    raise ValueError(f"--{key.replace('_', '-')} {s[key]} conflicts with the skip path's {value}; drop it")
                s[key] = value
        s["steps"] = len(path.evaluate)  # the path's own grid (its fine grid, for a grid-points path)
        s["corrections"] = path.settings.get("corrections")  # learned coefficients, if calibrated with them
        if path.teleport is not None:  # the path starts below t_max from its Gaussian's closed-form ODE
            s["teleport"] = path.teleport
    s["steps"] = 20 if s["steps"] is None else s["steps"]
    if s["solver"] is None and s["method"] not in (None, "multistep"):
        raise ValueError(f"--method {s['method']} is a DPM-Solver method and the default solver is {DEFAULT_SOLVER}; "
                         "add --solver dpmsolver++ (or dpmsolver)")
    s["solver"] = s["solver"] or DEFAULT_SOLVER
    s["method"] = s["method"] or "multistep"
    s["skip_type"] = s["skip_type"] or DEFAULT_SKIP_TYPE
    solver = s["solver"]
    spec = solver_spec(solver)
    if spec.first_order and "order" in given:
        raise ValueError(f"--order does nothing with --solver {solver} (first order); drop it")
    s["order"] = s["order"] or spec.default_order
    if s["solver_type"] is not None and (not spec.variants or s["order"] == 1):
        raise ValueError(f"--solver-type does nothing with --solver {solver} at order {s['order']}; drop it")
    s["solver_type"] = check_settings(solver, s["method"], s["order"], s["steps"], s["skip_type"], "eps", s["solver_type"])
    if not spec.variants:
        s["solver_type"] = None
    if s["order"] not in spec.orders:
        raise ValueError(f"--order {s['order']} is not available for {solver}")
    if timesteps is not None:
        if len(timesteps) != s["steps"] + 1:
            raise ValueError(f"the skip path's time grid has {len(timesteps)} times for {s['steps']} steps; "
                             "re-run calibrate.py")
        s["skip_type"], s["timesteps"] = None, [float(t) for t in timesteps]
    return s


def selected_skip_path(args: argparse.Namespace) -> SkipPath:
    """The path of --skip-path FILE for --steps N evaluations (the only one when --steps is not given)."""
    from pdm.sampling.budgets import PathFile

    if args.skip_path == "embedded":
        from pdm.checkpoints import embedded_skip_paths

        text = embedded_skip_paths(args.ckpt[0]) if args.ckpt and len(args.ckpt) == 1 else None
        if text is None:
            raise ValueError("--skip-path embedded needs one --ckpt export with paths in it (python -m "
                             "pdm.checkpoints CKPT OUT.safetensors --skip-paths FILE)")
        paths = PathFile.from_json(text, f"the paths embedded in {args.ckpt[0]}")
    else:
        paths = PathFile.load(args.skip_path)
    return paths.select(args.steps, f"--skip-path {args.skip_path}")


def skip_config(args: argparse.Namespace, given: set[str],
                path: SkipPath | None = None) -> AdaptiveSkip | SkipPath | None:
    """The skipping asked for, or None; flags that would do nothing are rejected."""
    tuning = {"max_skips", "skip_warmup", "skip_shared", "skip_official"} & given
    if args.skip_path is not None:
        if args.skip_threshold is not None or tuning:
            raise ValueError("a --skip-path fixes the skipped steps; drop --skip-threshold and the other skip flags")
        return path
    if args.skip_threshold is None:
        if tuning:
            raise ValueError(f"--{sorted(tuning)[0].replace('_', '-')} does nothing without --skip-threshold; drop it "
                             "or add --skip-threshold")
        return None
    kw = {k: v for k, v in (("max_skips", args.max_skips), ("warmup", args.skip_warmup)) if v is not None}
    if args.skip_official:
        return AdaptiveSkip.official(args.skip_threshold, per_sample=not args.skip_shared, **kw)
    return AdaptiveSkip(args.skip_threshold, per_sample=not args.skip_shared, **kw)


def check_flags(args: argparse.Namespace, given: set[str]) -> tuple[dict, AdaptiveSkip | SkipPath | None, torch.device]:
    """Every check that needs no checkpoint, before anything is loaded or written."""
    if not str(args.out).strip():
        raise ValueError("--out is empty; name an output folder")
    if args.num_samples < 1 or args.batch_size < 1 or args.shard_size < 1:
        raise ValueError("--num-samples, --batch-size and --shard-size must be positive")
    check_seed(args.seed)
    check_guidance_scale(args.guidance_scale)
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard-index must be in [0, --num-shards), got {args.shard_index} of {args.num_shards}")
    if args.force_skip_path and args.skip_path is None:
        raise ValueError("--force-skip-path does nothing without --skip-path; drop it")
    if args.compile_mode is not None and not args.compile:
        raise ValueError("--compile-mode does nothing without --compile; add --compile or drop it")
    path = selected_skip_path(args) if args.skip_path is not None else None
    settings = resolve_settings(args, given, path)
    skip = skip_config(args, given, path)
    if skip is not None and settings["method"] == "adaptive":
        raise ValueError("step skipping cannot be combined with --method adaptive; use multistep or singlestep")
    device = parse_device(args.device)
    precision_dtype(args.precision, device)
    if args.compile:
        check_compile(args.precision, device)
    return settings, skip, device


def compile_mode(args: argparse.Namespace) -> str | None:
    """The torch.compile mode asked for, or None for an eager network."""
    return (args.compile_mode or "default") if args.compile else None


def _plain(settings: dict) -> dict:
    """``settings`` as JSON reads them back (a teleport as its description)."""
    return json.loads(json.dumps(settings, default=repr))


def run_identity(args: argparse.Namespace, settings: dict, skip, ckpt_hashes: list[str]) -> dict:
    """Everything that decides which images land in the shards (see :mod:`pdm.outputs`)."""
    from pdm import __version__
    from pdm.outputs import code_fingerprint

    skip_desc = None if skip is None else {"kind": type(skip).__name__, **json.loads(json.dumps(skip.__dict__, default=str))}
    return {"pdm_version": __version__, "code": code_fingerprint(), "checkpoints": sorted(ckpt_hashes),
            "settings": {**_plain(settings), "denoise_to_zero": args.denoise_to_zero, "thresholding": args.thresholding,
                         "guidance_scale": args.guidance_scale, "labels": args.labels, "seed": args.seed,
                         "skip": skip_desc, "precision": args.precision,
                         "compile": compile_mode(args)},
            "num_samples": args.num_samples, "shard_size": args.shard_size}


def main(argv: list[str] | None = None) -> dict:
    """Sample (or merge parts), write the outputs and return the stats."""
    args = parse_args(argv)
    given = given_flags(argv)
    interrupt = _Interrupt()
    previous = signal.signal(signal.SIGINT, interrupt) if _main_thread() else None
    try:
        if args.merge is not None:
            from pdm.outputs import merge_parts

            if not str(args.out).strip():
                raise ValueError("--out is empty; name an output folder")
            return merge_parts([Path(p) for p in args.merge], Path(args.out))
        if not args.ckpt:
            raise ValueError("--ckpt is required (or --merge PART_DIR ...)")
        settings, skip, device = check_flags(args, given)
        return sample_run(args, settings, skip, device, interrupt)
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


def sample_run(args: argparse.Namespace, settings: dict, skip, device: torch.device,
               interrupt: _Interrupt | None = None) -> dict:
    """Load the model, make this invocation's shards and, once all exist, the final outputs.

    Under torchrun or srun every rank runs this: rank 0 prepares the folder, the shards still
    missing are dealt out round-robin, and rank 0 writes the final files when all ranks are done.
    """
    launch = detect()
    device = launch.device(device)
    launch.start(device)
    try:
        return _sample_shards(args, settings, skip, device, launch, interrupt or _Interrupt())
    finally:
        launch.stop()


def _sample_shards(args: argparse.Namespace, settings: dict, skip, device: torch.device, launch: Launch,
                   interrupt: _Interrupt) -> dict:
    from pdm.checkpoints import load_for_sampling
    from pdm.outputs import file_sha256, is_recorded, make_shard, shard_paths, write_outputs

    loaded = load_for_sampling(args.ckpt, args.guidance_scale, device, args.precision,
                               compile_mode(args), args.batch_size)
    if args.labels is not None:
        if loaded.num_classes is None:
            raise ValueError("--labels given for an unconditional model; drop --labels")
        bad = [y for y in args.labels if not 0 <= y < loaded.num_classes]
        if bad:
            raise ValueError(f"class labels {bad} are out of range for {loaded.num_classes} classes "
                             f"(use 0..{loaded.num_classes - 1})")
    out = Path(args.out)
    hashes = [file_sha256(p) for p in args.ckpt]
    if isinstance(skip, SkipPath) and not args.force_skip_path:
        # embedded paths travel with their weights: only the guidance scale can be wrong
        made = (skip.settings.get("calibrated_for") or {}).get("checkpoints") if args.skip_path == "embedded" else None
        skip.check_calibrated_for(made or hashes, args.guidance_scale, [str(p) for p in args.ckpt],
                                  f"--skip-path {args.skip_path}")
    identity = run_identity(args, settings, skip, hashes)
    paths = shard_paths(out, args.num_samples, args.shard_size)
    todo = _claim(args, out, identity, paths, launch, {"device": str(device), "batch_size": args.batch_size,
                                                       "torch": torch.__version__, "processes": launch.world_size,
                                                       "model": loaded.config, "ckpt": list(args.ckpt)})
    interrupt.paths = [paths[k] for k in range(len(paths)) if k % args.num_shards == args.shard_index]
    batch = _checked_batch(args, loaded, settings, skip, interrupt.check)
    shape = (loaded.in_channels, loaded.image_size, loaded.image_size)
    done = 0
    for k in todo[launch.rank::launch.world_size]:
        indices = range(k * args.shard_size, min((k + 1) * args.shard_size, args.num_samples))
        done += make_shard(paths[k], indices, shape, loaded.num_classes, args.seed, args.labels, args.batch_size,
                           device, batch)
        interrupt.made += 1
    done = sum(launch.gather(done))
    # a cheap count here; write_outputs checks every shard's hash before it merges them
    missing = sum(not is_recorded(p) for p in paths) if launch.rank == 0 else 0
    if missing:
        if launch.rank == 0:
            print(f"part {args.shard_index} of {args.num_shards} done: {len(paths) - missing} of {len(paths)} shards "
                  f"in {out}; when every part is done, join them with `python sample.py --merge PART_DIR ... --out DIR`",
                  file=sys.stderr)
        return {"images_sampled_this_run": done, "shards_missing": missing}
    if launch.rank != 0:
        return {"images_sampled_this_run": done, "written_by_rank": 0}
    return write_outputs(out, paths, loaded.num_classes is not None, loaded.image_size, done, skip is not None)


def _claim(args: argparse.Namespace, out: Path, identity: dict, paths: list[Path], launch: Launch,
           info: dict) -> list[int]:
    """Rank 0 makes ``out`` this run's (or refuses, for every rank) and reads which of this
    part's shards are unfinished; every rank gets the same list before any rank writes."""
    from pdm.outputs import prepare_out, shard_state, write_manifest

    refused, states = None, None
    mine = [k for k in range(len(paths)) if k % args.num_shards == args.shard_index]
    if launch.rank == 0:
        try:
            prepare_out(out, identity, args.overwrite, [str(c) for c in args.ckpt])
            write_manifest(out, identity, info)
            states = {k: shard_state(paths[k]) for k in mine}
        except (ValueError, WriteError) as e:  # every rank stops with rank 0's one line
            refused = str(e)
    refused, states = launch.broadcast((refused, states))
    if refused is not None:
        raise ValueError(refused)
    todo = [k for k in mine if states[k] != "finished"]
    if launch.rank == 0:
        for k in (k for k in todo if states[k] == "damaged"):
            print(f"{paths[k].name} does not match its recorded hash (damaged or unfinished); remaking it",
                  file=sys.stderr)
    return todo


def _checked_batch(args: argparse.Namespace, loaded, settings: dict, skip,
                   check_interrupt: Callable[[], None]) -> Callable:
    """``batch(noise, model_kwargs)``: sample one batch, refusing non-finite images."""
    from pdm.sampling import sample

    sample_batch = partial(sample, loaded.model_fn, schedule=loaded.schedule, prediction=loaded.prediction, skip=skip,
                           denoise_to_zero=args.denoise_to_zero, thresholding=args.thresholding, progress=args.progress,
                           **{k: v for k, v in settings.items() if v is not None})

    def batch(noise: torch.Tensor, model_kwargs: dict):
        check_interrupt()
        res = sample_batch(noise, model_kwargs=model_kwargs)
        if not bool(torch.isfinite(res.x).all()):  # one read-back per batch, none per step
            hint = ("fp16 overflowed; use --precision bf16 (same speed on recent GPUs, fp32's range)"
                    if args.precision == "fp16" else "the checkpoint may be broken (NaN weights?)")
            raise ValueError(f"sampling produced non-finite values: {hint}")
        return res

    return batch


if __name__ == "__main__":
    main()
