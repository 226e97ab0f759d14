"""A calibrate.py path file on held-out seeds: its error against the best plain setting.

    python benchmarks/calibration_holdout.py --ckpt runs/digits/checkpoints/step0000800.ckpt \
        --paths digits_paths.json [--guidance-scale 1.5] [--seeds 48]

For every budget N in the file: the path's RMS error per pixel against an accurate ODE solution
(UniPC-3, 500 logSNR steps) on scoring seeds that calibration never uses, beside the best plain
setting of benchmarks/solver_accuracy.py (every solver, order and grid) at N NFE chosen on those
same seeds, and the fitted / validation errors calibrate.py recorded. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import SCORE_SEEDS, digits_bench, machine, markdown_table, rms  # noqa: E402
from benchmarks.solver_accuracy import settings  # noqa: E402
from pdm.sampling.budgets import PathFile  # noqa: E402


def holdout_rows(bench, paths: PathFile, seeds) -> list[list]:
    """One row per budget: NFE, fit, validation, held-out, best plain (and which), ratio."""
    ref, ref_err = bench.reference(seeds)
    rows = []
    for nfe in paths.budgets:
        path = paths.select(nfe)
        held = rms(bench.run(seeds, **path.sample_kwargs()).x, ref)
        plain = min((rms(bench.run(seeds, steps=nfe, **kw).x, ref), f"{family} {grid}") for family, grid, kw in settings())
        report = path.settings.get("calibration") or {}
        rows.append([nfe, f"{report.get('fit_error', float('nan')):.3e}", f"{report.get('validation_error', float('nan')):.3e}",
                     f"{held:.3e}", f"{plain[0]:.3e} ({plain[1]})", f"{held / plain[0]:.2f}",
                     "yes" if report.get("fallback") else "no", "yes" if path.settings.get("corrections") else "no"])
    print(f"reference's own error {ref_err:.1e}", file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="the checkpoint the paths were calibrated for")
    p.add_argument("--paths", required=True, help="a calibrate.py path file")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--seeds", type=int, default=48, help="held-out scoring seeds")
    args = p.parse_args()
    paths = PathFile.load(args.paths)
    made = float((paths.calibrated_for or {}).get("guidance_scale", args.guidance_scale))
    if made != args.guidance_scale:
        raise SystemExit(f"calibration_holdout.py: error: {args.paths} was calibrated at guidance {made}, not "
                         f"{args.guidance_scale}")
    bench = digits_bench(args.ckpt, guidance_scale=args.guidance_scale)
    rows = holdout_rows(bench, paths, SCORE_SEEDS[: args.seeds])
    print(f"machine: {machine()}; guidance {args.guidance_scale}; {args.seeds} held-out seeds\n")
    print(markdown_table(["NFE", "fit", "validation", "held-out", "best plain (held-out seeds)", "ratio",
                          "built-in kept", "coefficients"], rows))


if __name__ == "__main__":
    main()
