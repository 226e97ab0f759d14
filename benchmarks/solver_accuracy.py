"""Error against an accurate ODE solution versus NFE, for every solver, order and time grid.

    python benchmarks/solver_accuracy.py [--ckpt runs/digits/checkpoints/last.ckpt] [--seeds 64]

Models: the exact noise predictor of a Gaussian mixture, and the trained digits model (if a
checkpoint is found). For each solver setting and NFE in 4..25: RMS error per pixel of the
final samples against an accurate solution (UniPC-3, 500 logSNR steps; a second, independent
solution's disagreement is reported as the reference's own error), on the scoring seeds.
On digits, the best grid of each solver also gets the FD-8x8 and classifier accuracy of 1,000
samples at 5, 8 and 10 NFE. Writes benchmarks/results/solver_accuracy.{json,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    HERE,
    SCORE_SEEDS,
    Bench,
    digits_bench,
    find_digits_checkpoint,
    machine,
    markdown_table,
    mixture_bench,
    rms,
    to_uint8,
    write_json,
)

NFES = (4, 5, 6, 8, 10, 15, 20, 25)
GRIDS = ("time_uniform", "logSNR", "time_quadratic", "edm")
FAMILIES = {
    "DDIM": dict(solver="ddim"),
    "DPM-Solver++(2M)": dict(solver="dpmsolver++", order=2),
    "DPM-Solver++(3M)": dict(solver="dpmsolver++", order=3),
    "DPM-Solver-3 (singlestep)": dict(solver="dpmsolver", order=3, method="singlestep"),
    "UniPC-2 bh1": dict(solver="unipc", order=2, solver_type="bh1"),
    "UniPC-2 bh2": dict(solver="unipc", order=2, solver_type="bh2"),
    "UniPC-3 bh1": dict(solver="unipc", order=3, solver_type="bh1"),
    "UniPC-3 bh2": dict(solver="unipc", order=3, solver_type="bh2"),
    "iPNDM-3": dict(solver="ipndm", order=3),
    "iPNDM-4": dict(solver="ipndm", order=4),
    "DEIS-tAB2": dict(solver="deis", order=2),
    "DEIS-tAB3": dict(solver="deis", order=3),
}
FD_NFES = (5, 8, 10)


def settings() -> list[tuple[str, str, dict]]:
    """(family, grid, sample kwargs) for every plain setting the project offers."""
    return [
        (family, grid, dict(kw, skip_type=grid))
        for family, kw in FAMILIES.items()
        for grid in GRIDS
    ]


def error_table(bench: Bench, seeds, nfes=NFES) -> dict:
    """{"reference_error", "errors": {family: {grid: {nfe: rms}}}} on ``seeds``."""
    ref, ref_err = bench.reference(seeds)
    errors: dict = {}
    for family, grid, kw in settings():
        errors.setdefault(family, {})[grid] = {
            n: rms(bench.run(seeds, steps=n, **kw).x, ref) for n in nfes
        }
    return {"reference_error": ref_err, "errors": errors}


def best_per_nfe(errors: dict, families=None) -> dict[int, tuple[float, str, str]]:
    """{nfe: (error, family, grid)} of the most accurate setting at each NFE."""
    out = {}
    for family, grids in errors.items():
        if families is not None and family not in families:
            continue
        for grid, by_nfe in grids.items():
            for n, e in by_nfe.items():
                n = int(n)
                if n not in out or e < out[n][0]:
                    out[n] = (e, family, grid)
    return out


def fd_table(bench: Bench, errors: dict, num: int = 1000) -> list[dict]:
    """FD-8x8 and classifier accuracy of ``num`` samples for each family's most accurate grid."""
    from pdm.metrics import classifier_accuracy, digits_fd_baseline, digits_fd_metric, fid_against

    seeds = range(SCORE_SEEDS.start + 10_000, SCORE_SEEDS.start + 10_000 + num)
    stats, floor = digits_fd_baseline(num)
    labels = bench.kwargs(seeds)["y"].numpy()
    rows = []
    for family, grids in errors.items():
        for n in FD_NFES:
            grid = min(grids, key=lambda g: grids[g][n])
            images = to_uint8(bench.run(seeds, steps=n, **dict(FAMILIES[family], skip_type=grid)).x)
            rows.append(
                {
                    "family": family,
                    "grid": grid,
                    "nfe": n,
                    "fd8x8": fid_against(digits_fd_metric(), stats, images),
                    "floor": floor,
                    "accuracy": classifier_accuracy(images, labels),
                }
            )
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        for family, grids in r["errors"].items():
            best = {n: min(g[n] for g in grids.values()) for n in NFES}
            ax.plot(list(best), list(best.values()), "o-", label=family, markersize=3)
        ax.axhline(r["reference_error"], color="grey", ls=":", label="reference's own error")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS error vs accurate ODE solution (best grid)")
        ax.set_title(r["model"])
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--ckpt", default=None, help="digits checkpoint (default: newest runs/digits/**/last.ckpt)"
    )
    p.add_argument("--seeds", type=int, default=64, help="scoring seeds per model")
    p.add_argument("--fd-samples", type=int, default=1000)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    benches = [mixture_bench()]
    ckpt = find_digits_checkpoint(args.ckpt)
    if ckpt:
        benches.append(digits_bench(ckpt))
    else:
        print(
            "no digits checkpoint found: run `python train.py fit --config configs/digits.yaml` first",
            file=sys.stderr,
        )
    seeds = SCORE_SEEDS[: args.seeds]
    results = []
    for bench in benches:
        t0 = time.perf_counter()
        print(
            f"{bench.name}: solving {len(settings())} settings x {len(NFES)} NFE ...",
            file=sys.stderr,
            flush=True,
        )
        res = {"model": bench.name, **error_table(bench, seeds)}
        if bench.name == "digits":
            res["fd"] = fd_table(bench, res["errors"], args.fd_samples)
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        write_json(
            Path(args.out) / "solver_accuracy.json",
            {"machine": machine(), "seeds": args.seeds, "results": results},
        )
    plot(results, Path(args.out) / "solver_accuracy.png")
    report(results)


def report(results: list[dict]) -> None:
    """Markdown tables: the best grid of each family per NFE, and the FD table."""
    print(f"machine: {machine()}\n")
    for r in results:
        print(
            f"### {r['model']}: RMS error vs the accurate solution (reference's own error {r['reference_error']:.1e})\n"
        )
        rows = []
        for family, grids in r["errors"].items():
            cells = []
            for n in NFES:
                grid = min(
                    grids, key=lambda g: grids[g][str(n)] if str(n) in grids[g] else grids[g][n]
                )
                e = grids[grid][n] if n in grids[grid] else grids[grid][str(n)]
                cells.append(f"{e:.2e} ({grid})")
            rows.append([family] + cells)
        print(markdown_table(["solver (best grid)"] + [f"NFE {n}" for n in NFES], rows) + "\n")
        if "fd" in r:
            fd_rows = [
                [
                    f["family"],
                    f["grid"],
                    f["nfe"],
                    f"{f['fd8x8']:.4f} ({f['fd8x8'] / f['floor']:.2f}x floor)",
                    f"{f['accuracy']:.3f}",
                ]
                for f in r["fd"]
            ]
            print(markdown_table(["solver", "grid", "NFE", "FD-8x8", "classifier"], fd_rows) + "\n")


if __name__ == "__main__":
    main()
