"""Skipping against the best plain solver at equal or lower NFE, judged on held-out seeds.

    python benchmarks/skip_tradeoff.py [--ckpt runs/digits/checkpoints/last.ckpt]

For each model (the exact Gaussian mixture; the trained digits model without and with
classifier-free guidance 1.5) and each NFE budget:
  - plain: every solver, order and time grid of solver_accuracy.py at every NFE <= budget;
    the best on the scoring seeds (an optimistic baseline: chosen where it is scored);
  - adaptive skipping (pdm's AdaptiveSkip: error criterion, forecast fill) and the official
    AdaptiveDiffusion criterion (latent test, reuse), over base grids and thresholds;
  - calibrated paths, one per solver: the learned time schedule of calibrate_schedule (points
    of a 100-step logSNR grid, then moved off it by the continuous time search).
Every skip configuration is selected on CALIBRATION_SEEDS (the threshold, the base grid, the
solver, the calibrated path itself) and then scored once on SCORE_SEEDS; the two seed sets are
disjoint. A calibrated path is fitted on the first calibration seeds and chosen among solvers on
the next ones (validation seeds), since its error on the seeds it was fitted to flatters it. The reference is an accurate ODE solution (benchmarks.common.Bench.reference).
Reported: RMS error and PSNR (data range 2) against it, and on digits the FD-8x8 and classifier
accuracy of 1,000 samples. Writes benchmarks/results/skip_tradeoff.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    CALIBRATION_SEEDS,
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
from benchmarks.solver_accuracy import settings  # noqa: E402
from pdm.calibration import calibrate_schedule  # noqa: E402
from pdm.sampling import AdaptiveSkip  # noqa: E402

BUDGETS = (5, 8, 10, 12, 15, 20, 25)  # 5 and 8: the learned time schedule at the low-NFE frontier
THRESHOLDS = {
    "adaptive": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    "official": (0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
}
SKIP_SOLVERS = {
    "DPM-Solver++(2M)": dict(solver="dpmsolver++", order=2),
    "UniPC-3": dict(solver="unipc", order=3),
    "iPNDM-4": dict(solver="ipndm", order=4),
}
CALIBRATED = {
    "iPNDM-3": dict(solver="ipndm", order=3),
    "iPNDM-4": dict(solver="ipndm", order=4),
    "UniPC-3 bh1": dict(solver="unipc", order=3, solver_type="bh1"),
}
FINE_STEPS = 100
MODELS = ("mixture", "digits", "digits_cfg1.5")
HALVINGS = 3  # of the continuous time search (calibrate_schedule's default is 5)


def score_seeds(n: int) -> range:
    """The seeds scored in this benchmark."""
    return SCORE_SEEDS[:n]


def calibration_seeds(n: int) -> range:
    """The seeds every skip configuration is chosen or calibrated on (disjoint from the scored ones)."""
    return CALIBRATION_SEEDS[:n]


def validation_seeds(n_calib: int, n: int) -> range:
    """The seeds that choose among calibrated paths: after the calibration seeds, disjoint from
    them (a path's error on the seeds it was fitted to flatters it) and from the scored ones."""
    return CALIBRATION_SEEDS[n_calib : n_calib + n]


def psnr(err: float) -> float:
    """PSNR (dB) of an RMS error for data in [-1, 1]."""
    return 20 * math.log10(2.0 / max(err, 1e-12))


def plain_errors(bench: Bench, seeds, ref, nfes=range(4, max(BUDGETS) + 1)) -> list[dict]:
    """The error on ``seeds`` of every plain setting (solver, order, grid) at every NFE in ``nfes``."""
    return [
        {
            "family": family,
            "error": rms(bench.run(seeds, steps=n, **kw).x, ref),
            "setting": f"{family}, {grid}",
            "nfe": n,
        }
        for family, grid, kw in settings()
        for n in nfes
    ]


def plain_frontier(records: list[dict], family_prefix: str = "") -> dict[int, dict]:
    """{nfe: best plain setting at exactly that NFE} among ``records`` (from :func:`plain_errors`) of
    the families whose name starts with ``family_prefix`` (all by default; "DPM-Solver++" for the
    best DPM-Solver++ setting)."""
    best: dict[int, dict] = {}
    for r in records:
        n = r["nfe"]
        if r["family"].startswith(family_prefix) and (
            n not in best or r["error"] < best[n]["error"]
        ):
            best[n] = {"error": r["error"], "setting": r["setting"], "nfe": n}
    return best


def adaptive_runs(bench: Bench, calib, calib_ref, score, score_ref, kind: str) -> list[dict]:
    """Every adaptive configuration run on both seed sets: its NFE and error on each."""
    runs = []
    for label, kw in SKIP_SOLVERS.items():
        for grid in ("logSNR", "time_quadratic"):
            for base in (15, 20, 25, 30, 40):
                for thr in THRESHOLDS[kind]:
                    skip = (
                        AdaptiveSkip(threshold=thr)
                        if kind == "adaptive"
                        else AdaptiveSkip.official(threshold=thr)
                    )
                    args = dict(steps=base, skip_type=grid, skip=skip, **kw)
                    c, s = bench.run(calib, **args), bench.run(score, **args)
                    runs.append(
                        {
                            "setting": f"{label}, {grid}, {base} steps, threshold {thr}",
                            "calib_nfe": c.nfe,
                            "calib_error": rms(c.x, calib_ref),
                            "nfe": s.nfe,
                            "error": rms(s.x, score_ref),
                        }
                    )
    return runs


def select(runs: list[dict], budget: int) -> dict | None:
    """The run with the least calibration error among those within the budget on calibration seeds."""
    ok = [r for r in runs if r["calib_nfe"] <= budget + 1e-9]
    return min(ok, key=lambda r: r["calib_error"]) if ok else None


def calibrated(
    bench: Bench,
    calib,
    calib_ref,
    score,
    score_ref,
    budget: int,
    halvings: int = HALVINGS,
    val=None,
    val_ref=None,
) -> list[dict]:
    """A calibrated path per solver for ``budget``, fitted on ``calib``, with its errors on the
    calibration, validation (``val``, when given) and scored seeds."""
    tried = []
    for label, kw in CALIBRATED.items():
        t0 = time.perf_counter()
        path = calibrate_schedule(
            bench.model_fn,
            bench.noise(calib),
            bench.schedule,
            nfe=budget,
            steps=FINE_STEPS,
            prediction=bench.prediction,
            model_kwargs=bench.kwargs(calib),
            skip_type="logSNR",
            halvings=halvings,
            **kw,
        )
        c, s = bench.run(calib, **path.sample_kwargs()), bench.run(score, **path.sample_kwargs())
        v = rms(bench.run(val, **path.sample_kwargs()).x, val_ref) if val is not None else None
        tried.append(
            {
                "setting": f"calibrated {label}, {budget}-NFE path",
                "budget": budget,
                "calib_error": rms(c.x, calib_ref),
                "val_error": v,
                "nfe": s.nfe,
                "error": rms(s.x, score_ref),
                "seconds": time.perf_counter() - t0,
                "path": path.to_dict(),
            }
        )
    return tried


def choose_calibrated(paths: list[dict], budget: int) -> dict:
    """Among the calibrated paths spending no more than ``budget`` evaluations (those fitted for
    smaller budgets included, as the plain baseline takes any NFE <= budget), the one with the
    least validation error (calibration error when there was no validation); never the scored one."""
    key = "val_error" if all(p.get("val_error") is not None for p in paths) else "calib_error"
    return min((p for p in paths if p["nfe"] <= budget + 1e-9), key=lambda p: p[key])


def fd_row(bench: Bench, args: dict, num: int) -> dict:
    """FD-8x8 (and its ratio to the floor) and classifier accuracy of ``num`` samples."""
    from pdm.metrics import classifier_accuracy, digits_fd_baseline, digits_fd_metric, fid_against

    seeds = SCORE_SEEDS[20_000 : 20_000 + num]
    stats, floor = digits_fd_baseline(num)
    images = to_uint8(bench.run(seeds, **args).x)
    fd = fid_against(digits_fd_metric(), stats, images)
    return {
        "fd8x8": fd,
        "fd_ratio": fd / floor,
        "accuracy": classifier_accuracy(images, bench.kwargs(seeds)["y"].numpy()),
    }


def run_bench(
    bench: Bench,
    n_score: int,
    n_calib: int,
    fd_samples: int,
    adaptive: bool = True,
    halvings: int = HALVINGS,
    budgets: tuple[int, ...] = BUDGETS,
    n_val: int = 32,
) -> dict:
    score, calib, val = (
        score_seeds(n_score),
        calibration_seeds(n_calib),
        validation_seeds(n_calib, n_val),
    )
    score_ref, ref_err = bench.reference(score)
    calib_ref, _ = bench.reference(calib)
    val_ref, _ = bench.reference(val)
    records = plain_errors(
        bench, score, score_ref, nfes=range(4, max(*BUDGETS, *budgets) + 1)
    )  # each run once
    plain, dpmpp = plain_frontier(records), plain_frontier(records, family_prefix="DPM-Solver++")
    runs = {
        kind: adaptive_runs(bench, calib, calib_ref, score, score_ref, kind) if adaptive else []
        for kind in ("adaptive", "official")
    }
    rows, paths = [], []
    for budget in budgets:
        best_plain = min((v for n, v in plain.items() if n <= budget), key=lambda v: v["error"])
        tried = calibrated(
            bench, calib, calib_ref, score, score_ref, budget, halvings, val, val_ref
        )
        paths += tried
        chosen = choose_calibrated(paths, budget)
        row = {
            "budget": budget,
            "plain": best_plain,
            "dpmsolver++": dpmpp[budget],
            "calibrated": chosen,
            "calibrated_tried": tried,
            "adaptive": select(runs["adaptive"], budget),
            "official": select(runs["official"], budget),
        }
        if bench.num_classes is not None and fd_samples:
            if "fd" not in best_plain:
                best_plain["fd"] = fd_row(bench, _plain_args(best_plain), fd_samples)
            if "fd" not in chosen:
                chosen["fd"] = fd_row(bench, _calibrated_args(bench, calib, chosen), fd_samples)
        rows.append(row)
        print(
            f"{bench.name} budget {budget}: plain {best_plain['error']:.2e} ({best_plain['setting']}), calibrated "
            f"{chosen['error']:.2e} ({chosen['setting']})",
            file=sys.stderr,
            flush=True,
        )
    return {
        "model": bench.name,
        "reference_error": ref_err,
        "plain": plain,
        "runs": runs,
        "rows": rows,
        "score_seeds": [score.start, score.stop],
        "calibration_seeds": [calib.start, calib.stop],
        "validation_seeds": [val.start, val.stop],
    }


def _plain_args(best: dict) -> dict:
    family, grid = best["setting"].split(", ")
    from benchmarks.solver_accuracy import FAMILIES

    return dict(FAMILIES[family], skip_type=grid, steps=best["nfe"])


def _calibrated_args(bench: Bench, calib, chosen: dict) -> dict:
    from pdm.sampling import LearnedSchedule

    return LearnedSchedule.from_dict(chosen["path"]).sample_kwargs(bench.schedule)


def images_per_second(
    bench: Bench, result: dict, budget: int = 10, batch: int = 250, rounds: int = 3
) -> dict:
    """Wall-clock images/s at equal quality (float32, as sample.py runs, median of ``rounds``):
    the calibrated path chosen for ``budget`` against the cheapest plain setting whose error on
    the scoring seeds is no larger (the plain frontier), and per-sample adaptive skipping against
    the plain run of its own grid (the network runs only on the rows that need it)."""
    from pdm.sampling import sample

    row = next(r for r in result["rows"] if r["budget"] == budget)
    cal = row["calibrated"]
    matching = sorted((int(n), v) for n, v in result["plain"].items() if v["error"] <= cal["error"])
    runs = {f"calibrated path, {budget} NFE": _calibrated_args(bench, None, cal)}
    if matching:
        runs[f"plain at equal quality ({matching[0][1]['setting']}, {matching[0][0]} NFE)"] = (
            _plain_args(matching[0][1])
        )
    runs[f"plain at the same NFE ({row['plain']['setting']}, {row['plain']['nfe']} NFE)"] = (
        _plain_args(row["plain"])
    )
    grid = dict(steps=30, solver="ipndm", order=3, skip_type="logSNR")
    runs["plain iPNDM-3, logSNR, 30 steps"] = grid
    runs["adaptive skipping on that grid (threshold 1)"] = dict(
        grid, skip=AdaptiveSkip(threshold=1.0)
    )
    seeds = SCORE_SEEDS[30_000 : 30_000 + batch]
    noise, kwargs = bench.noise(seeds).float(), bench.kwargs(seeds)
    ref = bench.reference(seeds)[0].float()
    times: dict[str, list[float]] = {k: [] for k in runs}
    out = {}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, args in runs.items():
                t0 = time.perf_counter()
                res = sample(
                    bench.model_fn,
                    noise,
                    bench.schedule,
                    prediction=bench.prediction,
                    model_kwargs=kwargs,
                    **args,
                )
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
                out[name] = {"nfe": res.nfe, "error": rms(res.x, ref)}
    for name in runs:
        out[name]["images_per_second"] = batch / sorted(times[name])[len(times[name]) // 2]
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.3), squeeze=False)
    for ax, r in zip(axes[0], results):
        pts = sorted((int(n), v["error"]) for n, v in r["plain"].items())
        frontier = [(n, min(e for m, e in pts if m <= n)) for n, _ in pts]
        ax.plot(*zip(*frontier), "k-", label="best plain setting (any solver, order, grid)")
        for kind, style in (("adaptive", "o"), ("official", "x")):
            ax.plot(
                [x["nfe"] for x in r["runs"][kind]],
                [x["error"] for x in r["runs"][kind]],
                style,
                alpha=0.35,
                markersize=3,
                label=f"{kind} skipping (all settings)",
            )
        ax.plot(
            [row["calibrated"]["nfe"] for row in r["rows"]],
            [row["calibrated"]["error"] for row in r["rows"]],
            "s-",
            color="tab:red",
            label="calibrated path (fitted and chosen on calibration seeds)",
        )
        ax.set_yscale("log")
        ax.set_xlim(3, max(BUDGETS) + 3)
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS error vs ODE solution (held-out seeds)")
        ax.set_title(r["model"])
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results: list[dict]) -> None:
    """Markdown tables per model: per budget, the best plain setting and the skip methods."""
    print(f"machine: {machine()}\n")
    for r in results:
        print(f"### {r['model']} (reference's own error {r['reference_error']:.1e})\n")
        rows = []
        for row in r["rows"]:
            p, c = row["plain"], row["calibrated"]
            cells = [
                row["budget"],
                f"{p['error']:.2e} ({psnr(p['error']):.1f} dB) {p['setting']}",
                f"{c['error']:.2e} ({psnr(c['error']):.1f} dB) {c['setting']}",
                f"{c['error'] / p['error']:.2f}",
            ]
            for kind in ("adaptive", "official"):
                a = row[kind]
                cells.append(
                    "-"
                    if a is None
                    else f"{a['error']:.2e} @ {a['nfe']:.1f} ({a['error'] / p['error']:.2f})"
                )
            if "fd" in p:
                cells.append(f"{p['fd']['fd_ratio']:.2f} / {c['fd']['fd_ratio']:.2f}")
            d = row.get("dpmsolver++")
            cells.append(
                "-"
                if d is None
                else f"{d['error']:.2e} {d['setting']} ({c['error'] / d['error']:.2f})"
            )
            rows.append(cells)
        header = [
            "NFE budget",
            "best plain",
            "calibrated",
            "ratio",
            "adaptive (NFE, ratio)",
            "official (NFE, ratio)",
        ]
        if "fd" in r["rows"][0]["plain"]:
            header.append("FD/floor plain / calibrated")
        header.append("best DPM-Solver++ at that NFE (calibrated / it)")
        print(markdown_table(header, rows) + "\n")
        speed = r.get("images_per_second") or {}
        if speed and all(isinstance(v, dict) and "nfe" in v for v in speed.values()):
            print(
                markdown_table(
                    ["run (250 images, float32)", "NFE", "RMS error", "images/s"],
                    [
                        [k, f"{v['nfe']:.1f}", f"{v['error']:.2e}", f"{v['images_per_second']:.1f}"]
                        for k, v in speed.items()
                    ],
                )
                + "\n"
            )


def speed_only(args: argparse.Namespace) -> None:
    """Re-time images/s from the saved results (the CPU should be otherwise idle)."""
    path = Path(args.out) / "skip_tradeoff.json"
    saved = json.loads(path.read_text())
    ckpt = find_digits_checkpoint(args.ckpt)
    if not ckpt:
        raise SystemExit(
            "no digits checkpoint found: run `python train.py fit --config configs/digits.yaml` first"
        )
    for res in saved["results"]:
        if res["model"] == "digits":
            res["images_per_second"] = images_per_second(digits_bench(ckpt), res)
    write_json(path, saved)
    report(saved["results"])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--ckpt", default=None)
    p.add_argument("--score-seeds", type=int, default=48)
    p.add_argument(
        "--calibration-seeds", type=int, default=32, help="seeds a calibrated path is fitted on"
    )
    p.add_argument(
        "--validation-seeds", type=int, default=32, help="seeds that choose among calibrated paths"
    )
    p.add_argument("--fd-samples", type=int, default=1000)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument(
        "--speed-only", action="store_true", help="only re-time images/s on the saved results"
    )
    p.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=MODELS, help="which models to run"
    )
    p.add_argument(
        "--no-adaptive",
        action="store_true",
        help="leave out the adaptive-skipping sweep (the slow part)",
    )
    p.add_argument(
        "--halvings", type=int, default=HALVINGS, help="of the calibration's continuous time search"
    )
    p.add_argument(
        "--budgets", type=int, nargs="+", default=list(BUDGETS), help="NFE budgets to run"
    )
    args = p.parse_args()
    if args.speed_only:
        return speed_only(args)
    benches = [mixture_bench()] if "mixture" in args.models else []
    ckpt = find_digits_checkpoint(args.ckpt)
    if ckpt:
        benches += [
            digits_bench(ckpt, guidance_scale=g)
            for name, g in (("digits", 1.0), ("digits_cfg1.5", 1.5))
            if name in args.models
        ]
    elif set(args.models) - {"mixture"}:
        print(
            "no digits checkpoint found: run `python train.py fit --config configs/digits.yaml` first",
            file=sys.stderr,
        )
    results = []
    for bench in benches:
        t0 = time.perf_counter()
        res = run_bench(
            bench,
            args.score_seeds,
            args.calibration_seeds,
            args.fd_samples,
            not args.no_adaptive,
            args.halvings,
            tuple(args.budgets),
            args.validation_seeds,
        )
        if bench.name == "digits" and 10 in args.budgets:
            res["images_per_second"] = images_per_second(bench, res)
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        write_json(
            Path(args.out) / "skip_tradeoff.json", {"machine": machine(), "results": results}
        )
    plot(results, Path(args.out) / "skip_tradeoff.png")
    report(results)


if __name__ == "__main__":
    main()
