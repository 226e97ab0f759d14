"""Calibrate skip paths for a trained PDM: a learned time schedule per budget, checked on held-out images.

    python calibrate.py --ckpt runs/digits/checkpoints/last.ckpt --nfe 5 10 20 --out digits_paths.json
    python sample.py --ckpt runs/digits/checkpoints/last.ckpt --skip-path digits_paths.json --steps 10 --out samples/x

The path is found on calibration noise drawn from --seed (default 1000000, a stream that
sample.py's usual seeds never touch; images are drawn as sample.py draws image i of a seed) and
classes cycling through every label. It is a learned time schedule for this model (and this
guidance scale): the search keeps --nfe points of a --steps grid, then moves those times off
the grid to where the error on the calibration images is least (--grid-points-only stops
before that; --time-search warp instead moves three smooth warp coefficients of the best
built-in grid: cheaper, and on digits as good at 5 NFE only); the replay runs the network at
those times only, with the solver settings recorded in the file. The solver is chosen per
budget (--solver auto: iPNDM-3 below 16 NFE, UniPC-3 bh1 from 16) unless named. With
--coefficients, one coefficient per step also rescales the solver's multistep correction
(pdm.sampling.coefficients). See pdm.sampling.calibrate_skip_path.

With --screen N the calibration images are not a plain random draw: N candidates are solved
cheaply to find the ones few steps get most wrong, a --hard-fraction of the images comes from
those, the rest at random, and every error is a weighted RMS that still estimates the mean over
all images (pdm.sampling.screening). The images are split: (1 - --validation-fraction) of them
fit the path, the rest only check it. The time search stops at the step size where the
validation error is least, and a path whose validation error is not below that of the best
plain setting of the same NFE (every solver, order, variant and built-in grid; chosen on all the
images) is replaced by that setting, with a warning. One accurate solution of all images serves every budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pdm.atomic import WriteError
from pdm.cli import EXIT_INTERRUPTED, check_guidance_scale, check_seed, fail, parse_device, parser
from pdm.nn.runtime import PRECISIONS, precision_dtype
from pdm.sampling import SOLVERS
from pdm.sampling.calibration import TIME_SEARCHES
from pdm.sampling.catalog import all_variants, solver_spec
from pdm.sampling.evaluator import CountingModel
from pdm.sampling.teleport import GaussianData, Teleport


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    p = parser(__doc__)
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint or export; two for an expert pair")
    p.add_argument("--nfe", type=int, nargs="+", required=True,
                   help="network evaluations the path may spend; several budgets go into one file")
    p.add_argument("--out", required=True, help="the JSON file to write (refused if it exists, unless --overwrite)")
    p.add_argument("--validation-fraction", type=float, default=0.25,
                   help="share of the --num-seeds images that only check the paths (default 0.25; 0: none)")
    p.add_argument("--steps", type=int, default=100, help="the fine grid's steps (default 100)")
    p.add_argument("--solver", default="auto", choices=["auto", *(s for s in SOLVERS if solver_spec(s).deterministic)],
                   help="the solver the path replays with; default auto: iPNDM-3 below 16 NFE, UniPC-3 bh1 from 16 "
                        "(the better of the two on learned times at each budget on digits, benchmarks/RESULTS.md)")
    p.add_argument("--order", type=int, default=None, help="the named --solver's order (default 3)")
    p.add_argument("--solver-type", default=None, choices=all_variants(),
                   help="the solver's variant (bh1/bh2 for UniPC, dpmsolver/taylor for DPM-Solver)")
    p.add_argument("--skip-type", default="logSNR", help="the fine grid (default logSNR)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="calibrate for this classifier-free guidance")
    p.add_argument("--num-seeds", type=int, default=32, help="calibration images (default 32)")
    p.add_argument("--screen", type=int, default=None,
                   help="screen this many candidate images for the hard tail and draw the --num-seeds from them "
                        "(stratified, weighted; e.g. 8 x --num-seeds; default: no screening). Measured on digits "
                        "it did not protect new images from the rare flips that carry the RMS (benchmarks/RESULTS.md)")
    p.add_argument("--hard-fraction", type=float, default=0.25,
                   help="with --screen: share of the calibration and of the validation images taken from the hardest "
                        "screened candidates, weighted so the error still estimates the mean (default 0.25)")
    p.add_argument("--seed", type=int, default=1_000_000, help="calibration noise stream (keep it apart from scored seeds)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="the network's precision while calibrating (calibrate with the precision you sample in)")
    p.add_argument("--time-search", default="free", choices=TIME_SEARCHES,
                   help="how the times move off the fine grid: free (each on its own; default), warp (three smooth "
                        "warp coefficients of the best start grid, whatever the NFE) or warp+free")
    p.add_argument("--coefficients", action="store_true",
                   help="after the times, learn one solver coefficient per step (pdm.sampling.coefficients; kept only "
                        "where the validation images gain). Held out on digits it helped at 5, 10 and 20 NFE with and "
                        "without guidance; on a small exact mixture at 8 NFE it halved the median image's error but "
                        "not the RMS over 1,280 new images (1.06x times only) and new images' error was 1.37x the "
                        "validation error (times only: within 1.25x); see benchmarks/RESULTS.md")
    p.add_argument("--teleport-data", default=None, metavar="CONFIG",
                   help="also let each path start below t_max from the ODE solved in closed form for a Gaussian "
                        "of the training data (pdm.sampling.teleport; Wang & Vastola 2023): CONFIG is the training "
                        "config whose data section names the data (e.g. configs/digits.yaml); the Gaussian goes "
                        "into the path file")
    p.add_argument("--teleport-rank", type=int, default=16,
                   help="principal directions kept per class for the teleport's Gaussian (default 16; on digits 8 did "
                        "as well as all 1024)")
    p.add_argument("--teleport-images", type=int, default=20_000,
                   help="training images the Gaussian is fitted to, at most (default 20000)")
    p.add_argument("--grid-points-only", action="store_true",
                   help="keep the evaluations on the --steps grid (skip the continuous time search)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """Every check that needs no checkpoint; raises ValueError naming the fix."""
    bad = [n for n in args.nfe if not 1 <= n <= args.steps]
    if bad:
        raise ValueError(f"--nfe must be in 1..--steps ({args.steps}), got {bad[0]}")
    if not 0 <= args.validation_fraction < 1:
        raise ValueError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    if args.num_seeds < 1:
        raise ValueError("--num-seeds must be positive")
    if args.screen is not None and args.screen < args.num_seeds:
        raise ValueError(f"--screen ({args.screen}) must be at least --num-seeds ({args.num_seeds})")
    if not 0 <= args.hard_fraction < 1:
        raise ValueError(f"--hard-fraction must be in [0, 1), got {args.hard_fraction}")
    check_seed(args.seed)
    check_guidance_scale(args.guidance_scale)
    if args.teleport_data is not None:
        if not Path(args.teleport_data).is_file():
            raise ValueError(f"--teleport-data {args.teleport_data!r} does not exist; name the training config "
                             "(YAML) the model was trained with, e.g. configs/digits.yaml")
        if args.teleport_rank < 1 or args.teleport_images < 2:
            raise ValueError("--teleport-rank must be positive and --teleport-images at least 2")
        if args.grid_points_only:
            raise ValueError("--teleport-data moves the first time off the grid; drop --grid-points-only")
    out = Path(args.out)
    if out.suffix != ".json":
        raise ValueError(f"--out {args.out!r} should name a .json file")
    if out.is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; name a .json file")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{args.out!r} exists; pass --overwrite to replace it or choose another --out")
    if not out.parent.exists():
        raise ValueError(f"the folder of --out ({out.parent}) does not exist")


def main(argv: list[str] | None = None) -> dict:
    """Calibrate, save the path and return a summary."""
    args = parse_args(argv)
    try:
        check(args)
        device = parse_device(args.device)
        precision_dtype(args.precision, device)
        return calibrate(args, device)
    except (ValueError, WriteError) as e:
        fail("calibrate.py", str(e))
    except KeyboardInterrupt:
        fail("calibrate.py", f"interrupted; nothing was written to {args.out}", EXIT_INTERRUPTED)


def calibrate(args: argparse.Namespace, device: torch.device) -> dict:
    """Load the model, draw the calibration batch, search the path and write it."""
    from pdm.checkpoints import load_for_sampling
    from pdm.outputs import file_sha256, noise_and_label
    from pdm.sampling.budgets import PathFile, calibrate_budgets, split_rows
    from pdm.sampling.screening import screening_scores, stratified_draw

    solver_for, solver = _solvers(args)
    print(f"calibrate.py: loading {' and '.join(args.ckpt)} on {device}; then {args.num_seeds} images are solved "
          f"accurately on a {args.steps}-step grid (the slow part), then paths of {', '.join(map(str, args.nfe))} "
          f"evaluations are searched",
          file=sys.stderr, flush=True)
    loaded = load_for_sampling(args.ckpt, args.guidance_scale, device, args.precision)
    shape = (loaded.in_channels, loaded.image_size, loaded.image_size)
    classes = list(range(loaded.num_classes)) if loaded.num_classes else None
    screen = args.num_seeds if args.screen is None else args.screen
    drawn = [noise_and_label(args.seed, i, shape, loaded.num_classes, classes) for i in range(screen)]
    noise = torch.stack([n for n, _ in drawn]).to(device)
    kwargs = {"y": torch.tensor([y for _, y in drawn], device=device)} if classes else {}
    model_fn = CountingModel(loaded.model_fn)  # the cost: these evaluations x one image's time
    t0 = time.perf_counter()
    fit_rows, val_rows = split_rows(args.num_seeds, args.validation_fraction)
    n_fit, n_val = fit_rows.stop - fit_rows.start, val_rows.stop - val_rows.start
    screened = screen > args.num_seeds  # else the draw takes every candidate, in order, unweighted
    if screened:
        print(f"calibrate.py: screening {screen} candidate images for the hard tail", file=sys.stderr, flush=True)
        scores = screening_scores(model_fn, noise, loaded.schedule, kwargs, loaded.prediction, progress=True)
    else:
        scores = torch.zeros(screen)
    draw = stratified_draw(scores, n_fit, n_val, args.hard_fraction, args.seed)
    rows = torch.tensor(draw.indices, device=device)
    noise, kwargs = noise[rows], {k: v[rows] for k, v in kwargs.items()}
    teleport = None if args.teleport_data is None else Teleport(_gaussian(args, loaded, shape), args.guidance_scale)
    paths = calibrate_budgets(model_fn, noise, loaded.schedule, args.nfe, args.validation_fraction,
                              args.steps, progress=True, continuous=not args.grid_points_only,
                              prediction=loaded.prediction, model_kwargs=kwargs, skip_type=args.skip_type,
                              coefficients=args.coefficients, weights=draw.weights if screened else None,
                              time_search=args.time_search, solver_for=solver_for, teleport=teleport, **solver)
    made_for = {"checkpoints": sorted(file_sha256(p) for p in args.ckpt), "files": [str(p) for p in args.ckpt],
                "guidance_scale": args.guidance_scale, "precision": args.precision, "seed": args.seed,
                "num_seeds": args.num_seeds, "screened": screen, "hard_fraction": args.hard_fraction,
                "images": draw.indices, "hard_images": draw.hard, "time_search": args.time_search,
                "solver": args.solver, "coefficients": args.coefficients}
    if teleport is not None:
        made_for["teleport_data"] = {"config": args.teleport_data, "rank": args.teleport_rank,
                                     "images": args.teleport_images}
    for path in paths.values():
        path.settings["calibrated_for"] = made_for
    teleporting = any(p.teleport is not None for p in paths.values())
    PathFile(paths, made_for, teleport.data if teleporting else None).save(args.out)
    seconds = round(time.perf_counter() - t0, 1)
    budgets = {n: _report(n, p, args.steps) for n, p in paths.items()}
    summary = {"out": args.out, "seconds": seconds, "budgets": budgets, "image_evaluations": model_fn.rows,
               "image_evaluations_per_image": round(model_fn.rows / args.num_seeds, 1)}
    if len(budgets) == 1:
        summary |= next(iter(budgets.values()))
    print(f"wrote {args.out}: paths for {', '.join(map(str, budgets))} NFE ({seconds} s, {model_fn.rows} network "
          f"evaluations of one image); sample with --skip-path {args.out} --steps N", file=sys.stderr)
    return summary


def _gaussian(args: argparse.Namespace, loaded, shape: tuple[int, ...]):
    """The Gaussian of the training data named by --teleport-data, rounded as the file stores it."""
    import importlib

    import yaml

    section = (yaml.safe_load(Path(args.teleport_data).read_text()) or {}).get("data")
    if not section or "class_path" not in section:
        raise ValueError(f"--teleport-data {args.teleport_data!r} has no data section with a class_path; name the "
                         "training config the model was trained with")
    module, _, name = section["class_path"].rpartition(".")
    data = getattr(importlib.import_module(module), name)(**(section.get("init_args") or {}))
    print(f"calibrate.py: fitting the teleport's Gaussian to up to {args.teleport_images} images of "
          f"{section['class_path']}", file=sys.stderr, flush=True)
    data.setup("fit")
    xs, ys, n = [], [], 0
    for x, y in data.train_dataloader():
        xs.append(x.double()), ys.append(torch.as_tensor(y))
        n += x.shape[0]
        if n >= args.teleport_images:
            break
    x, y = torch.cat(xs)[:args.teleport_images], torch.cat(ys)[:args.teleport_images]
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"--teleport-data {args.teleport_data!r} gives images of shape {tuple(x.shape[1:])}, the "
                         f"model makes {shape}; name the config it was trained with")
    fitted = GaussianData.fit(x, y if loaded.num_classes else None, loaded.num_classes, args.teleport_rank)
    return GaussianData.from_dict(fitted.to_dict())  # calibrate with exactly what the file replays


def _solvers(args: argparse.Namespace) -> tuple[Callable[[int], dict] | None, dict]:
    """(per-budget solver settings or None, the settings for every budget), checked; ValueError
    naming the fix for a flag that does not apply."""
    from pdm.sampling import check_settings
    from pdm.sampling.budgets import auto_solver

    if args.solver == "auto":
        if args.order is not None or args.solver_type is not None:
            raise ValueError("--order and --solver-type need a named --solver (auto chooses iPNDM-3 below 16 NFE "
                             "and UniPC-3 bh1 from 16); add e.g. --solver unipc")
        return auto_solver, auto_solver(min(args.nfe))
    order = 3 if args.order is None else args.order
    has_variants = bool(solver_spec(args.solver).variants)
    if args.solver_type is not None and not has_variants:
        raise ValueError(f"--solver-type does nothing with --solver {args.solver}; drop it")
    solver_type = check_settings(args.solver, "multistep", order, args.steps, args.skip_type, "eps", args.solver_type)
    return None, {"solver": args.solver, "order": order} | ({"solver_type": solver_type} if has_variants else {})


def _report(nfe: int, path, steps: int) -> dict:
    """One budget's summary, printed as one line on stderr (a warning when the grid was kept)."""
    kept = [i for i, e in enumerate(path.evaluate) if e]
    cal = path.settings.get("calibration") or {}
    out = {"nfe": path.nfe, "kept": kept, "timesteps": path.settings.get("timesteps"), **cal}
    errors = f"fit error {cal['fit_error']:.3e}" if "fit_error" in cal else ""
    if "validation_error" in cal:
        errors += (f", validation {cal['validation_error']:.3e} (best plain, {cal['builtin_setting']}: "
                   f"{cal['builtin_validation_error']:.3e})")
    if cal.get("fallback"):
        print(f"calibrate.py: warning: at {nfe} NFE the calibrated path did not beat the best plain setting "
              f"({cal['builtin_setting']}) on the validation images ({errors}); the file "
              "keeps that setting", file=sys.stderr)
        return out
    where = (f"times {', '.join(f'{t:.4g}' for t in out['timesteps'][:-1])}" if out["timesteps"]
             else f"grid points {kept} of {steps}")
    print(f"calibrate.py: {nfe} NFE: {where}; {errors}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
