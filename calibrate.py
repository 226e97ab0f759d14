"""Learn a schedule for a trained PDM: per budget, the times (and optionally solver coefficients)
at which few network evaluations come closest to the exact ODE solution, checked on held-out images.

    python calibrate.py --ckpt runs/digits/checkpoints/step0000800.ckpt --nfe 5 10 20 --out digits.json
    python sample.py --ckpt runs/digits/checkpoints/step0000800.ckpt --schedule digits.json --steps 10 --out DIR

The calibration images are drawn from --seed (default 1000000, a stream that sample.py's usual
seeds never touch) as sample.py draws image i, with classes cycling through every label. A
quarter of them only check the result: the search stops where their error is least, and a
schedule that does not beat the best plain setting of the same NFE on them (every solver, order,
variant and built-in grid) is replaced by that setting, with a warning. One accurate solution of
all images (on a --steps grid) serves every budget. The schedule holds for this checkpoint and
this guidance scale; sample.py refuses it for others. See pdm.calibration.
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
from pdm.sampling import SOLVERS, check_settings
from pdm.sampling.catalog import solver_spec

TELEPORT_RANK, TELEPORT_IMAGES = (
    16,
    20_000,
)  # principal directions per class; images the Gaussian is fitted to


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    p = parser(__doc__)
    p.add_argument(
        "--ckpt",
        action="append",
        required=True,
        help="checkpoint or export; two for an expert pair",
    )
    p.add_argument(
        "--nfe",
        type=int,
        nargs="+",
        required=True,
        help="network evaluations a schedule may spend; several budgets go into one file",
    )
    p.add_argument(
        "--out",
        required=True,
        help="the JSON file to write (refused if it exists, unless --overwrite)",
    )
    p.add_argument(
        "--solver",
        default="auto",
        metavar="auto|NAME[-ORDER[-VARIANT]]",
        help="the solver the schedules replay with: auto (iPNDM-3 below 16 NFE, UniPC-3 bh1 from 16) or "
        f"one of {', '.join(s for s in SOLVERS if solver_spec(s).deterministic)}, e.g. ipndm-3, "
        "unipc-3-bh1 (order 3 unless given)",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="calibrate for this classifier-free guidance",
    )
    p.add_argument(
        "--num-seeds", type=int, default=32, help="calibration images, a quarter of them validating"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1_000_000,
        help="calibration noise stream (keep it apart from scored seeds)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=100,
        help="the fine logSNR grid of the reference solution (default 100)",
    )
    p.add_argument(
        "--coefficients",
        action="store_true",
        help="after the times, learn one solver coefficient per step (kept only where the validation "
        "images gain)",
    )
    p.add_argument(
        "--teleport-data",
        default=None,
        metavar="CONFIG",
        help="let each schedule start below t_max from the ODE solved in closed form for a Gaussian of the "
        "training data; CONFIG is the training config whose data section names the data (e.g. "
        "configs/digits.yaml); the Gaussian goes into the schedule file",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="the network's precision while calibrating (calibrate in the precision you sample in)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def solver_settings(
    spec: str, nfe: list[int], steps: int
) -> tuple[Callable[[int], dict] | None, dict]:
    """(per-budget solver settings or None, the settings for every budget) of ``--solver``; a
    ValueError naming the fix for one that does not parse or apply."""
    from pdm.calibration import auto_solver

    if spec == "auto":
        return auto_solver, auto_solver(min(nfe))
    name, *rest = spec.split("-")
    if name not in SOLVERS or not solver_spec(name).deterministic or len(rest) > 2:
        raise ValueError(
            f"--solver {spec!r} is not auto or NAME[-ORDER[-VARIANT]] of a deterministic solver "
            f"({', '.join(s for s in SOLVERS if solver_spec(s).deterministic)}); e.g. unipc-3-bh1"
        )
    try:
        order = int(rest[0]) if rest else 3
    except ValueError:
        raise ValueError(f"--solver {spec!r}: the order must be a number, e.g. ipndm-3") from None
    variant = rest[1] if len(rest) > 1 else None
    if variant is not None and not solver_spec(name).variants:
        raise ValueError(f"--solver {spec!r}: {name} has no variants; drop -{variant}")
    variant = check_settings(name, "multistep", order, steps, "logSNR", "eps", variant)
    return None, {"solver": name, "order": order} | (
        {"solver_type": variant} if solver_spec(name).variants else {}
    )


def check(args: argparse.Namespace) -> None:
    """Every check that needs no checkpoint; raises ValueError naming the fix."""
    bad = [n for n in args.nfe if not 1 <= n <= args.steps]
    if bad:
        raise ValueError(f"--nfe must be in 1..--steps ({args.steps}), got {bad[0]}")
    if args.num_seeds < 1:
        raise ValueError("--num-seeds must be positive")
    check_seed(args.seed)
    check_guidance_scale(args.guidance_scale)
    solver_settings(args.solver, args.nfe, args.steps)
    if args.teleport_data is not None and not Path(args.teleport_data).is_file():
        raise ValueError(
            f"--teleport-data {args.teleport_data!r} does not exist; name the training config "
            "(YAML) the model was trained with, e.g. configs/digits.yaml"
        )
    out = Path(args.out)
    if out.suffix != ".json":
        raise ValueError(f"--out {args.out!r} should name a .json file")
    if out.is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; name a .json file")
    if out.exists() and not args.overwrite:
        raise ValueError(
            f"{args.out!r} exists; pass --overwrite to replace it or choose another --out"
        )
    if not out.parent.exists():
        raise ValueError(f"the folder of --out ({out.parent}) does not exist")


def main(argv: list[str] | None = None) -> dict:
    """Calibrate, save the schedules and return a summary."""
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
    """Load the model, draw the calibration batch, search the schedules and write them."""
    from pdm.calibration import CountingModel, calibrate_budgets
    from pdm.checkpoints import load_for_sampling
    from pdm.outputs import file_sha256, noise_and_label
    from pdm.sampling import ScheduleFile
    from pdm.sampling.teleport import Teleport

    solver_for, solver = solver_settings(args.solver, args.nfe, args.steps)
    print(
        f"calibrate.py: loading {' and '.join(args.ckpt)} on {device}; then {args.num_seeds} images are solved "
        f"accurately on a {args.steps}-step grid (the slow part), then schedules of "
        f"{', '.join(map(str, args.nfe))} evaluations are searched",
        file=sys.stderr,
        flush=True,
    )
    loaded = load_for_sampling(args.ckpt, args.guidance_scale, device, args.precision)
    shape = (loaded.in_channels, loaded.image_size, loaded.image_size)
    classes = list(range(loaded.num_classes)) if loaded.num_classes else None
    drawn = [
        noise_and_label(args.seed, i, shape, loaded.num_classes, classes)
        for i in range(args.num_seeds)
    ]
    noise = torch.stack([n for n, _ in drawn]).to(device)
    kwargs = {"y": torch.tensor([y for _, y in drawn], device=device)} if classes else {}
    model_fn = CountingModel(loaded.model_fn)  # the cost: these evaluations x one image's time
    t0 = time.perf_counter()
    teleport = (
        None
        if args.teleport_data is None
        else Teleport(_gaussian(args, loaded, shape), args.guidance_scale)
    )
    found = calibrate_budgets(
        model_fn,
        noise,
        loaded.schedule,
        args.nfe,
        steps=args.steps,
        progress=True,
        prediction=loaded.prediction,
        model_kwargs=kwargs,
        coefficients=args.coefficients,
        solver_for=solver_for,
        teleport=teleport,
        **solver,
    )
    made_for = {
        "checkpoints": sorted(file_sha256(p) for p in args.ckpt),
        "files": [str(p) for p in args.ckpt],
        "guidance_scale": args.guidance_scale,
        "precision": args.precision,
        "seed": args.seed,
        "num_seeds": args.num_seeds,
        "steps": args.steps,
        "solver": args.solver,
        "coefficients": args.coefficients,
        "teleport_data": args.teleport_data,
    }
    teleporting = any(s.teleport is not None for s in found.values())
    ScheduleFile(found, made_for, teleport.data if teleporting else None).save(args.out)
    seconds = round(time.perf_counter() - t0, 1)
    budgets = {n: _report(n, s) for n, s in found.items()}
    summary = {
        "out": args.out,
        "seconds": seconds,
        "budgets": budgets,
        "image_evaluations": model_fn.rows,
        "image_evaluations_per_image": round(model_fn.rows / args.num_seeds, 1),
    }
    if len(budgets) == 1:
        summary |= next(iter(budgets.values()))
    print(
        f"wrote {args.out}: schedules for {', '.join(map(str, budgets))} NFE ({seconds} s, {model_fn.rows} network "
        f"evaluations of one image); sample with --schedule {args.out} --steps N",
        file=sys.stderr,
    )
    return summary


def _gaussian(args: argparse.Namespace, loaded, shape: tuple[int, ...]):
    """The Gaussian of the training data named by --teleport-data, rounded as the file stores it."""
    import importlib

    import yaml

    from pdm.calibration import fit_gaussian
    from pdm.sampling.teleport import GaussianData

    section = (yaml.safe_load(Path(args.teleport_data).read_text()) or {}).get("data")
    if not section or "class_path" not in section:
        raise ValueError(
            f"--teleport-data {args.teleport_data!r} has no data section with a class_path; name the "
            "training config the model was trained with"
        )
    module, _, name = section["class_path"].rpartition(".")
    data = getattr(importlib.import_module(module), name)(**(section.get("init_args") or {}))
    print(
        f"calibrate.py: fitting the teleport's Gaussian to up to {TELEPORT_IMAGES} images of "
        f"{section['class_path']}",
        file=sys.stderr,
        flush=True,
    )
    data.setup("fit")
    xs, ys, n = [], [], 0
    for x, y in data.train_dataloader():
        xs.append(x.double()), ys.append(torch.as_tensor(y))
        n += x.shape[0]
        if n >= TELEPORT_IMAGES:
            break
    x, y = torch.cat(xs)[:TELEPORT_IMAGES], torch.cat(ys)[:TELEPORT_IMAGES]
    if tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"--teleport-data {args.teleport_data!r} gives images of shape {tuple(x.shape[1:])}, the "
            f"model makes {shape}; name the config it was trained with"
        )
    fitted = fit_gaussian(x, y if loaded.num_classes else None, loaded.num_classes, TELEPORT_RANK)
    return GaussianData.from_dict(fitted.to_dict())  # calibrate with exactly what the file replays


def _report(nfe: int, schedule) -> dict:
    """One budget's summary, printed as one line on stderr (a warning when a plain setting was kept)."""
    cal = schedule.calibration
    times = schedule.settings.timesteps
    out = {"nfe": schedule.nfe, "timesteps": list(times) if times else None, **cal}
    errors = f"fit error {cal['fit_error']:.3e}" if "fit_error" in cal else ""
    if "validation_error" in cal:
        errors += (
            f", validation {cal['validation_error']:.3e} (best plain, {cal['builtin_setting']}: "
            f"{cal['builtin_validation_error']:.3e})"
        )
    if cal.get("fallback"):
        print(
            f"calibrate.py: warning: at {nfe} NFE the learned schedule did not beat the best plain setting "
            f"({cal['builtin_setting']}) on the validation images ({errors}); the file keeps that setting",
            file=sys.stderr,
        )
        return out
    where = (
        f"times {', '.join(f'{t:.4g}' for t in times[:-1])}"
        if times
        else f"{nfe} points of the fine grid"
    )
    print(f"calibrate.py: {nfe} NFE: {where}; {errors}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
