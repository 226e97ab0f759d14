"""A calibrate.py path file on held-out seeds: its error against the best plain setting.

    python benchmarks/calibration_holdout.py --ckpt runs/digits/checkpoints/step0000800.ckpt \
        --paths times=digits_paths.json [times+coef=coef_paths.json] [--guidance-scale 1.5] [--seeds 48] \
        [--plot benchmarks/results/calibration_holdout.png]
    python benchmarks/calibration_holdout.py --mixture [--nfe 5 10 20]

With --mixture the model is the exact Gaussian mixture of the other benchmarks (closed-form
eps, no checkpoint): its paths are calibrated here, with calibrate.py's defaults (32 images of the
calibration seeds, a quarter validating, a 100-step logSNR grid, the solver chosen per budget as
``--solver auto`` does), then scored alike.

For every budget N in the file: the path's RMS error per pixel against an accurate ODE solution
(UniPC-3, 500 logSNR steps) on scoring seeds that calibration never uses, beside the best plain
setting of benchmarks/solver_accuracy.py (every solver, order and grid) at N NFE chosen on those
same seeds, and the fitted / validation errors calibrate.py recorded; beside the RMS over images,
the median of the per-image errors (one hard image can carry the RMS), and the RMS over the
images whose two independent reference solutions agree to a tenth of the best plain setting's
error there (elsewhere that error cannot be measured; the left-out images are named on stderr,
and the best plain setting is chosen again on the rest). With --fd-samples N, also
FD-8x8 (as a multiple of the real-vs-real floor) and classifier accuracy of N samples per budget,
for each path and that plain setting. Prints a Markdown table. With --blocks B, B consecutive
blocks of --seeds seeds are scored each on its own and the ratio per block is printed with its
median (one or two images per 200 can decide a block's RMS); with --worst K, the K images each
path gets most wrong are named with the step in which each sampler made its error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CALIBRATION_SEEDS,
    SCORE_SEEDS,
    Bench,
    digits_bench,
    machine,
    markdown_table,
    mixture_bench,
    per_image_rms,
)
from benchmarks.solver_accuracy import settings  # noqa: E402
from pdm.calibration import auto_solver, calibrate_budgets  # noqa: E402
from pdm.sampling import ScheduleFile  # noqa: E402
from pdm.sampling.sampler import sample  # noqa: E402


def holdout_rows(
    bench,
    paths: ScheduleFile,
    seeds,
    label: str = "",
    plain_cache: dict | None = None,
    ref=None,
    fd_samples: int = 0,
    disagreement: Tensor | None = None,
) -> list[list]:
    """One row per budget: label, NFE, fit, validation, held-out, best plain (and which), ratio,
    medians; with ``disagreement`` (per image, of two reference solutions), the RMS over the
    images whose reference is accurate enough to measure that budget's errors
    (:func:`trusted_images`) for the path and the best plain setting there; with ``fd_samples``,
    FD-8x8/floor and classifier accuracy of that many samples of the path and the best plain
    setting."""
    if ref is None:
        ref, ref_err = bench.reference(seeds)
        print(f"reference's own error {ref_err:.1e}", file=sys.stderr)
    plain_cache = {} if plain_cache is None else plain_cache
    rows = []
    for nfe in paths.budgets:
        path = paths.select(nfe)
        mine = per_image_rms(bench.run(seeds, **path.sample_kwargs(bench.schedule)).x, ref)
        if nfe not in plain_cache:
            runs = [
                (f"{family} {grid}", kw, per_image_rms(bench.run(seeds, steps=nfe, **kw).x, ref))
                for family, grid, kw in settings()
            ]
            plain_cache[nfe] = {
                "runs": runs,
                "best": min(runs, key=lambda r: float(r[2].pow(2).mean())),
            }
        name, plain_kw, theirs = plain_cache[nfe]["best"]
        held, plain_rms = float(mine.pow(2).mean().sqrt()), float(theirs.pow(2).mean().sqrt())
        report = path.calibration
        kept = (
            report.get("builtin_setting", report.get("builtin_grid", ""))
            if report.get("fallback")
            else "no"
        )
        rows.append(
            [
                label,
                nfe,
                f"{report.get('fit_error', float('nan')):.3e}",
                f"{report.get('validation_error', float('nan')):.3e}",
                f"{held:.3e}",
                f"{plain_rms:.3e} ({name})",
                f"{held / plain_rms:.2f}",
                kept,
                "yes" if path.settings.corrections else "no",
                f"{float(mine.median()):.2e} / {float(theirs.median()):.2e}",
                f"{float(mine.median() / theirs.median()):.2f}",
            ]
        )
        if disagreement is not None:
            mask = trusted_images(disagreement, theirs)
            if not mask.all():
                print(
                    f"{nfe} NFE: left out of the trusted column: "
                    + ", ".join(
                        f"seed {s}: references differ by {float(d):.1e}, best plain error {float(e):.1e}"
                        for s, d, e, ok in zip(seeds, disagreement, theirs, mask)
                        if not ok
                    ),
                    file=sys.stderr,
                )
            there = lambda e: float(e[mask].pow(2).mean().sqrt())  # noqa: E731
            best_there = min(plain_cache[nfe]["runs"], key=lambda r: there(r[2]))
            rows[-1] += [
                f"{there(mine):.2e} / {there(best_there[2]):.2e} ({best_there[0]})",
                f"{there(mine) / there(best_there[2]):.2f}",
            ]
        if fd_samples:
            from benchmarks.skip_tradeoff import fd_row

            if "fd" not in plain_cache[nfe]:
                plain_cache[nfe]["fd"] = fd_row(bench, {"steps": nfe, **plain_kw}, fd_samples)
            ours, fd_plain = (
                fd_row(bench, path.sample_kwargs(bench.schedule), fd_samples),
                plain_cache[nfe]["fd"],
            )
            rows[-1] += [
                f"{ours['fd_ratio']:.2f} / {fd_plain['fd_ratio']:.2f}",
                f"{ours['accuracy']:.3f} / {fd_plain['accuracy']:.3f}",
            ]
    return rows


def calibrate_here(
    bench: Bench, budgets: list[int], num_seeds: int = 32, **calibration_kwargs
) -> ScheduleFile:
    """Paths for ``budgets`` calibrated in this process on the first ``num_seeds`` calibration
    seeds (for a model without a checkpoint, e.g. the exact mixture), with calibrate.py's
    defaults unless ``calibration_kwargs`` say otherwise; the seconds it took are recorded."""
    kwargs = {
        "solver_for": None if "solver" in calibration_kwargs else auto_solver,
        **auto_solver(min(budgets)),
        **calibration_kwargs,
    }
    seeds = CALIBRATION_SEEDS[:num_seeds]
    t0 = time.perf_counter()
    paths = calibrate_budgets(
        bench.model_fn,
        bench.noise(seeds),
        bench.schedule,
        budgets,
        prediction=bench.prediction,
        model_kwargs=bench.kwargs(seeds),
        **kwargs,
    )
    seconds = round(time.perf_counter() - t0, 1)
    print(f"calibrated {bench.name} for {budgets} NFE in {seconds} s", file=sys.stderr)
    return ScheduleFile(
        paths,
        {
            "model": bench.name,
            "num_seeds": num_seeds,
            "seconds": seconds,
            "settings": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str))},
        },
    )


def carried_errors(
    bench: Bench, seeds, ref: Tensor, sample_kwargs: dict
) -> tuple[list[float], Tensor]:
    """Where a sampler's error is made: each step's start time, and per image (rows) the error it
    would end with if solved accurately (UniPC-3, 200 logSNR steps) from the sampler's state at
    that time, then the sampler's own end error (last column, time 0). A jump between two
    columns is error made in that step; a fall is error undone by the steps after."""
    states = []
    run = bench.run(
        seeds,
        **sample_kwargs,
        callback=lambda s: states.append((float(s.t.flatten()[0]), s.x.clone())),
    )
    times, errors = [], []
    for t, x in states:
        with torch.no_grad():
            end = (
                ref
                if t >= bench.schedule.t_max - 1e-9
                else sample(
                    bench.model_fn,
                    x,
                    bench.schedule,
                    steps=200,
                    solver="unipc",
                    order=3,
                    skip_type="logSNR",
                    prediction=bench.prediction,
                    model_kwargs=bench.kwargs(seeds),
                    t_start=t,
                ).x
            )
        times.append(t), errors.append(per_image_rms(end, ref))
    return times + [0.0], torch.stack(errors + [per_image_rms(run.x, ref)], dim=1)


def worst_images(
    bench: Bench,
    paths: ScheduleFile,
    label: str,
    seeds,
    ref: Tensor,
    disagreement: Tensor,
    plain_cache: dict,
    k: int,
) -> None:
    """Print (stderr) the ``k`` held-out images with the largest error of each budget's path: the
    path's and the best plain setting's error there, the references' disagreement, and the step
    in which each sampler made most of its error (:func:`carried_errors`)."""
    for nfe in paths.budgets:
        kwargs = {
            "path": paths.select(nfe).sample_kwargs(bench.schedule),
            "plain": {"steps": nfe, **plain_cache[nfe]["best"][1]},
        }
        worst = (
            per_image_rms(bench.run(seeds, **kwargs["path"]).x, ref)
            .argsort(descending=True)[:k]
            .tolist()
        )
        hard_seeds = [seeds[i] for i in worst]
        lines = {}
        for name, kw in kwargs.items():
            times, carried = carried_errors(bench, hard_seeds, ref[worst], kw)
            jump = (carried[:, 1:] - carried[:, :-1]).argmax(dim=1)
            lines[name] = [
                (float(carried[j, -1]), times[s], times[s + 1]) for j, s in enumerate(jump.tolist())
            ]
        print(
            f"{label}, {nfe} NFE: the {k} held-out images the path gets most wrong (best plain: "
            f"{plain_cache[nfe]['best'][0]}); error, and the step that made most of it",
            file=sys.stderr,
        )
        for j, i in enumerate(worst):
            (pe, pa, pb), (qe, qa, qb) = lines["path"][j], lines["plain"][j]
            print(
                f"  seed {seeds[i]}: path {pe:.1e} (t {pa:.3f} -> {pb:.3f}), plain {qe:.1e} (t {qa:.3f} -> {qb:.3f}), "
                f"references differ by {float(disagreement[i]):.1e}",
                file=sys.stderr,
            )


def trusted_images(
    disagreement: Tensor, errors: Tensor, fraction: float = 0.1, negligible: float = 1e-4
) -> Tensor:
    """The images whose reference is accurate enough to measure ``errors`` (per image, the best
    plain setting's at one budget): the two reference solutions disagree by at most ``fraction``
    of that error, or by less than ``negligible`` (an eightieth of one 8-bit level of images in
    [-1, 1]). Elsewhere no error below the disagreement can be measured, and one such image can
    carry the RMS over hundreds. Both references must be about equally accurate
    (:meth:`benchmarks.common.Bench.reference_per_image`): with a weaker second one, and a rule
    relative to the median disagreement instead of to the errors measured, this once left out
    the samplers' hardest images (digits: references 3.6e-4 apart, errors of 0.1)."""
    return (disagreement <= fraction * errors) | (disagreement <= negligible)


def plot(rows: list[list], out: Path, title: str) -> None:
    """Held-out error against NFE: the best plain setting and every labelled path file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    plain = sorted({(r[1], float(r[5].split()[0])) for r in rows})
    ax.plot(
        [n for n, _ in plain],
        [e for _, e in plain],
        "k--o",
        label="best plain setting (chosen on these seeds)",
    )
    for label in dict.fromkeys(r[0] for r in rows):
        pts = sorted((r[1], float(r[4])) for r in rows if r[0] == label)
        ax.plot([n for n, _ in pts], [e for _, e in pts], "-o", label=label)
    ax.set(
        xlabel="NFE",
        ylabel="RMS error per pixel vs accurate ODE solution",
        yscale="log",
        title=title,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_blocks(rows: list[list], labels: list[str], out: Path, title: str) -> None:
    """Ratio to the best plain setting against NFE, one dot per block and path, each path's median
    over the blocks joined by a line; the issue's 0.5x target and parity dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, label in enumerate(labels):
        mine = [(r[1], float(r[6])) for r in rows if r[0].startswith(f"{label} [")]
        nfes = sorted({n for n, _ in mine})
        shift = (k - (len(labels) - 1) / 2) * 0.25  # keep the dots of several paths apart
        ax.plot([n + shift for n, _ in mine], [x for _, x in mine], "o", alpha=0.5, color=f"C{k}")
        ax.plot(
            nfes,
            [statistics.median(x for n2, x in mine if n2 == n) for n in nfes],
            "-",
            color=f"C{k}",
            label=f"{label} (median over blocks)",
        )
    ax.axhline(1.0, color="k", ls="--", lw=1, label="best plain setting of each block")
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="0.5x target")
    ax.set(xlabel="NFE", ylabel="held-out RMS / best plain RMS", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def score_blocks(
    bench: Bench, loaded: list[tuple[str, ScheduleFile]], args: argparse.Namespace
) -> list[list]:
    """The rows of every path file on ``args.blocks`` consecutive blocks of ``args.seeds`` seeds
    (each block its own reference and best plain settings; FD only on the first);
    with several blocks each label names its block, and stderr gets, per path and budget, the
    ratio on every block and their median: on digits and the mixture one or two images per 200
    decide a block's RMS (benchmarks/RESULTS.md), so one block is a weak verdict."""
    rows = []
    for b in range(args.blocks):
        first = args.first_seed + b * args.seeds
        seeds = SCORE_SEEDS[first : first + args.seeds]
        ref, disagreement = bench.reference_per_image(seeds)
        print(
            f"seeds {first}-{first + args.seeds - 1}: reference's own error "
            f"{float(disagreement.pow(2).mean().sqrt()):.1e} (median per image {float(disagreement.median()):.1e}, "
            f"largest {float(disagreement.max()):.1e})",
            file=sys.stderr,
        )
        cache: dict = {}
        name = (
            (lambda label: f"{label} [seeds {first}-{first + args.seeds - 1}]")
            if args.blocks > 1
            else str
        )
        rows += [
            row
            for label, paths in loaded
            for row in holdout_rows(
                bench,
                paths,
                seeds,
                name(label),
                cache,
                ref,
                args.fd_samples if b == 0 else 0,
                disagreement,
            )
        ]
        if args.worst:
            for label, paths in loaded:
                worst_images(bench, paths, name(label), seeds, ref, disagreement, cache, args.worst)
    if args.blocks > 1:
        for label, _ in loaded:
            for nfe in sorted({r[1] for r in rows}):
                ratios = [
                    float(r[6]) for r in rows if r[0].startswith(f"{label} [") and r[1] == nfe
                ]
                if ratios:
                    print(
                        f"{label}, {nfe} NFE: ratio to the best plain setting per block "
                        f"{', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}",
                        file=sys.stderr,
                    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--ckpt", default=None, help="the checkpoint the paths were calibrated for")
    p.add_argument(
        "--paths",
        nargs="+",
        default=[],
        metavar="[LABEL=]FILE",
        help="calibrate.py path files, each optionally labelled (e.g. times=a.json times+coef=b.json)",
    )
    p.add_argument(
        "--mixture",
        action="store_true",
        help="the exact Gaussian mixture instead of --ckpt: calibrate its paths here (--nfe), then score",
    )
    p.add_argument(
        "--nfe",
        type=int,
        nargs="+",
        default=[5, 10, 20],
        help="with --mixture: the budgets (5 10 20)",
    )
    p.add_argument(
        "--teleport",
        action="store_true",
        help="with --mixture: also calibrate with a teleport (a Gaussian fitted to 20,000 mixture samples)",
    )
    p.add_argument(
        "--coefficients",
        action="store_true",
        help="with --mixture: also calibrate times + per-step coefficients (calibrate.py --coefficients)",
    )
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--seeds", type=int, default=48, help="held-out scoring seeds")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the first scoring seed (a block never looked at before gives an untouched check)",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="also draw held-out error vs NFE into this PNG (with --blocks: the ratio per block)",
    )
    p.add_argument(
        "--fd-samples",
        type=int,
        default=0,
        help="also FD-8x8/floor and classifier accuracy of this many samples (seeds 20000 on) per budget, "
        "for each path and the best plain setting (the issue asks 1000)",
    )
    p.add_argument(
        "--blocks",
        type=int,
        default=1,
        help="score --blocks consecutive blocks of --seeds seeds, each on its own (the ratio per block and "
        "its median on stderr): one block of 200 can be decided by one image",
    )
    p.add_argument(
        "--worst",
        type=int,
        default=0,
        metavar="K",
        help="also name (stderr) the K held-out images each path gets most wrong, beside the best plain "
        "setting's error there, and the step in which each made most of its error",
    )
    args = p.parse_args()
    if (
        args.mixture == bool(args.ckpt)
        or (args.ckpt and not args.paths)
        or (args.mixture and args.paths)
    ):
        p.error(
            "give either --ckpt with --paths (a checkpoint's path files) or --mixture (calibrated here)"
        )
    if args.blocks < 1:
        p.error("--blocks must be at least 1")
    if args.mixture and args.guidance_scale != 1.0:
        p.error("the mixture has no classes to guide; drop --guidance-scale")
    files = [(a.split("=", 1) if "=" in a else (Path(a).stem, a)) for a in args.paths]
    loaded = []
    for label, name in files:
        paths = ScheduleFile.load(name)
        made = float((paths.calibrated_for or {}).get("guidance_scale", args.guidance_scale))
        if made != args.guidance_scale:
            raise SystemExit(
                f"calibration_holdout.py: error: {name} was calibrated at guidance {made}, not "
                f"{args.guidance_scale}"
            )
        loaded.append((label, paths))
    if args.mixture:
        bench = mixture_bench()
        loaded.append(("mixture, calibrated here", calibrate_here(bench, args.nfe)))
        if args.coefficients:
            loaded.append(
                (
                    "mixture, calibrated here with coefficients",
                    calibrate_here(bench, args.nfe, coefficients=True),
                )
            )
        if args.teleport:
            from pdm.calibration import fit_gaussian
            from pdm.sampling.teleport import GaussianData, Teleport

            gm = bench.extra["mixture"]
            fitted = fit_gaussian(gm.sample(20_000, torch.Generator().manual_seed(0)), rank=16)
            teleport = Teleport(GaussianData.from_dict(fitted.to_dict()))
            loaded.append(
                (
                    "mixture, calibrated here with a teleport",
                    calibrate_here(bench, args.nfe, teleport=teleport),
                )
            )
    else:
        bench = digits_bench(args.ckpt, guidance_scale=args.guidance_scale)
    rows = score_blocks(bench, loaded, args)
    blocks = f" in {args.blocks} blocks" if args.blocks > 1 else ""
    print(
        f"machine: {machine()}; {bench.name}; {args.seeds * args.blocks} held-out seeds from {args.first_seed}"
        f"{blocks}\n"
    )
    print(
        markdown_table(
            [
                "paths",
                "NFE",
                "fit",
                "validation",
                "held-out",
                "best plain (held-out seeds)",
                "ratio",
                "plain setting kept",
                "coefficients",
                "median per image: path / that plain",
                "ratio",
                "RMS, trusted reference only: path / best plain there",
                "ratio",
            ]
            + (["FD-8x8/floor: path / plain", "accuracy: path / plain"] if args.fd_samples else []),
            rows,
        )
    )
    if args.plot:
        if args.blocks > 1:
            plot_blocks(
                rows,
                [label for label, _ in loaded],
                Path(args.plot),
                f"{bench.name}, {args.blocks} blocks of {args.seeds} seeds from {args.first_seed}",
            )
        else:
            plot(
                rows,
                Path(args.plot),
                f"{bench.name}, {args.seeds} held-out seeds from {args.first_seed}",
            )
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
