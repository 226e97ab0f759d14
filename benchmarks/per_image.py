"""Per-image step control against the batch-shared adaptive method and the best plain setting.

    python benchmarks/per_image.py --models mixture digits digits_cfg1.5 --ckpt CKPT \
        [--schedule FILE] [--seeds 200] [--plot benchmarks/results/per_image.png]

On held-out seeds (a block from --first-seed, disjoint from every calibration stream), against an
accurate ODE solution (UniPC-3, 500 logSNR steps): each image's RMS error, summarised as median,
p90, p99, max and RMS over the images, beside the mean and largest NFE, for
- the best plain setting at each NFE (every solver, order and grid, chosen on these same seeds:
  an optimistic baseline),
- a learned schedule (the mixture: calibrated here as calibrate.py would; digits: --schedule),
- DPM-Solver-12/23 with one step size for each batch of --batch images (the official rule),
- per-image step control, both estimators, over a range of tolerances.
With --throughput, images/s at --batch on the digits network: the batch-shared method, per-image
control in plain batches and with continuous batching, and a fixed-step run at the per-image
method's mean NFE. Prints Markdown tables; --plot draws error against mean NFE.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Bench,
    digits_bench,
    machine,
    markdown_table,
    mixture_bench,
    per_image_rms,
    write_json,
)
from benchmarks.solver_accuracy import settings  # noqa: E402
from pdm.sampling import Settings  # noqa: E402

PLAIN_NFES = (5, 8, 10, 12, 15, 20, 25, 30)
SCALES = (1.0, 0.3, 0.1, 0.03)  # tolerance = scale x DPM-Solver's (atol 0.0078, rtol 0.05)
PER_IMAGE = {
    "per-image DPM-Solver-12": dict(solver="dpmsolver++", order=2, estimator="singlestep"),
    "per-image DPM-Solver-23": dict(solver="dpmsolver++", order=3, estimator="singlestep"),
    "per-image 3M vs 2M": dict(solver="dpmsolver++", order=3, estimator="multistep"),
    "per-image iPNDM-3 vs 2": dict(solver="ipndm", order=3, estimator="multistep"),
}
SHARED = {"batch-shared DPM-Solver-12": 2, "batch-shared DPM-Solver-23": 3}
# DPM-Solver's form for its rows: data prediction (dpmsolver++, the default, as for guidance) or
# noise prediction (dpmsolver, --form noise)
FORM = {"data": "dpmsolver++", "noise": "dpmsolver"}


def summary(errors: torch.Tensor, nfe: torch.Tensor) -> dict:
    """The per-image errors and NFEs of one run, summarised."""
    q = lambda p: float(errors.quantile(p))  # noqa: E731
    return {
        "nfe": float(nfe.double().mean()),
        "nfe_max": int(nfe.max()),
        "rms": float(errors.pow(2).mean().sqrt()),
        "median": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": float(errors.max()),
        # why: how much of the squared error the worst 1% of images hold, and how many
        # evaluations the method gave them (an estimator that misses them gives them no more)
        **worst_share(errors, nfe),
    }


def worst_share(errors: torch.Tensor, nfe: torch.Tensor, fraction: float = 0.01) -> dict:
    """The share of the squared error in the worst ``fraction`` of images and their mean NFE."""
    k = max(1, round(fraction * len(errors)))
    worst = errors.topk(k).indices
    squared = errors.double().pow(2)
    return {
        "worst1pct_share": float(squared[worst].sum() / squared.sum()),
        "worst1pct_nfe": float(nfe[worst].double().mean()),
    }


def in_batches(bench: Bench, seeds, batch: int, **kw):
    """(x, nfe per image) of sample() run on consecutive batches of ``batch`` seeds."""
    xs, nfes = [], []
    for i in range(0, len(seeds), batch):
        res = bench.run(seeds[i : i + batch], **kw)
        xs.append(res.x), nfes.append(res.nfe_per_sample)
    return torch.cat(xs), torch.cat(nfes)


def curves(
    bench: Bench,
    seeds,
    ref: torch.Tensor,
    batch: int,
    schedule_file: str | None,
    dpm: str = FORM["data"],
) -> dict:
    """{method: [summary per setting]} on ``seeds``; ``dpm`` is DPM-Solver's form for its rows."""
    out: dict[str, list] = {"best plain": []}
    for n in PLAIN_NFES:
        runs = [
            (f"{fam} {grid}", in_batches(bench, seeds, batch, steps=n, **kw))
            for fam, grid, kw in settings()
        ]
        label, (x, nfe) = min(runs, key=lambda r: float(per_image_rms(r[1][0], ref).pow(2).mean()))
        out["best plain"].append({"setting": label, **summary(per_image_rms(x, ref), nfe)})
    for name, order in SHARED.items():
        out[name] = []
        for scale in SCALES[:3]:
            tol = dict(atol=0.0078 * scale, rtol=0.05 * scale)
            x, nfe = in_batches(
                bench, seeds, batch, solver=dpm, order=order, method="adaptive", **tol
            )
            out[name].append(
                {"setting": f"tolerance x{scale:g}", **summary(per_image_rms(x, ref), nfe)}
            )
    for name, kw in PER_IMAGE.items():
        out[name] = []
        for scale in SCALES:
            tol = dict(atol=0.0078 * scale, rtol=0.05 * scale)
            kw = {**kw, "solver": dpm} if kw["solver"] == FORM["data"] else kw
            x, nfe = in_batches(bench, seeds, batch, method="per_image", **kw, **tol)
            out[name].append(
                {"setting": f"tolerance x{scale:g}", **summary(per_image_rms(x, ref), nfe)}
            )
    learned = _learned(bench, schedule_file)
    if learned:
        out["learned schedule"] = []
        for nfe_budget, s in sorted(learned.items()):
            x, nfe = in_batches(bench, seeds, batch, **s)
            out["learned schedule"].append(
                {"setting": f"{nfe_budget} NFE", **summary(per_image_rms(x, ref), nfe)}
            )
    return out


def _learned(bench: Bench, schedule_file: str | None) -> dict:
    """{nfe: sample keywords} of a learned schedule: calibrated here for the mixture, else a file."""
    from pdm.sampling import ScheduleFile

    if bench.name == "mixture":
        from benchmarks.calibration_holdout import calibrate_here

        found = calibrate_here(bench, [10, 20])
    elif schedule_file:
        found = ScheduleFile.load(schedule_file)
    else:
        return {}
    return {n: found.select(n).sample_kwargs(bench.schedule) for n in found.budgets}


def at_equal_nfe(result: dict) -> list[list]:
    """Per-image rows with mean NFE in 10..30 against the best plain setting at the next whole NFE
    or above (the plain setting never gets fewer evaluations)."""
    plain = {round(r["nfe"]): r for r in result["best plain"]}
    rows = []
    for name in PER_IMAGE:
        for r in result[name]:
            if not 10 <= r["nfe"] <= 30:
                continue
            n = min((k for k in plain if k >= math.ceil(r["nfe"] - 1e-9)), default=None)
            if n is None:
                continue
            p = plain[n]
            rows.append(
                [
                    name,
                    r["setting"],
                    f"{r['nfe']:.1f}",
                    f"{p['setting']} @ {n}",
                    f"{r['rms'] / p['rms']:.2f}",
                    f"{r['p99'] / p['p99']:.2f}",
                    f"{r['median'] / p['median']:.2f}",
                ]
            )
    return rows


def throughput(ckpt: str, batch: int, images: int, guidance_scale: float) -> list[list]:
    """images/s at ``batch`` on the digits network, as sample.py runs it (fixed batch shapes)."""
    from pdm.checkpoints import load_for_sampling
    from pdm.sampling import sample
    from pdm.sampling.per_image import stream

    loaded = load_for_sampling([ckpt], guidance_scale, "cpu", batch_size=batch, fixed_batch=True)
    shape = (loaded.in_channels, loaded.image_size, loaded.image_size)
    g = torch.Generator().manual_seed(123)
    noise, y = (
        torch.randn(images, *shape, generator=g),
        torch.arange(images) % (loaded.num_classes or 1),
    )
    kw = {"y": y} if loaded.num_classes else {}

    def batched(s: Settings):
        nfe = []
        for i in range(0, images, batch):
            part = {k: v[i : i + batch] for k, v in kw.items()}
            res = sample(
                loaded.model_fn,
                noise[i : i + batch],
                loaded.schedule,
                s,
                prediction=loaded.prediction,
                model_kwargs=part,
            )
            nfe.append(res.nfe_per_sample)
        return float(torch.cat(nfe).double().mean())

    def streamed(s: Settings):
        items = ((i, noise[i], {k: v[i] for k, v in kw.items()}) for i in range(images))
        out = list(stream(loaded.model_fn, loaded.schedule, s, batch, items, loaded.prediction))
        return sum(n for _, _, n in out) / images

    rows = []
    per_image = Settings(solver="dpmsolver++", order=2, method="per_image")
    runs = [
        (
            "batch-shared DPM-Solver-12",
            batched,
            Settings(solver="dpmsolver++", order=2, method="adaptive"),
        ),
        ("per-image DPM-Solver-12, plain batches", batched, per_image),
        ("per-image DPM-Solver-12, continuous batching", streamed, per_image),
    ]
    for label, fn, s in runs:
        t0 = time.perf_counter()
        with torch.no_grad():
            nfe = fn(s)
        rows.append([label, f"{nfe:.1f}", f"{images / (time.perf_counter() - t0):.1f}"])
    steps = round(float(rows[-1][1]))
    t0 = time.perf_counter()
    with torch.no_grad():
        batched(Settings(steps=steps, solver="dpmsolver++", order=2, grid="logSNR"))
    rows.append(
        [
            f"fixed steps, DPM-Solver++(2M) logSNR, {steps} NFE",
            str(steps),
            f"{images / (time.perf_counter() - t0):.1f}",
        ]
    )
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 8), squeeze=False)
    for col, (model, result) in enumerate(results.items()):
        for row, key in enumerate(("rms", "p99")):
            ax = axes[row][col]
            for name, runs in result.items():
                pts = sorted((r["nfe"], r[key]) for r in runs)
                ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log"), ax.set_yscale("log")
            ax.set_xlabel("mean NFE per image"), ax.set_ylabel(f"{key} of per-image error")
            ax.set_title(f"{model}: {key}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models", nargs="+", default=["mixture"], choices=["mixture", "digits", "digits_cfg1.5"]
    )
    p.add_argument("--ckpt", default=None, help="the digits checkpoint")
    p.add_argument(
        "--schedule",
        default=None,
        help="a calibrate.py file for the digits checkpoint (no guidance)",
    )
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--first-seed", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--throughput",
        type=int,
        default=0,
        metavar="IMAGES",
        help="also time this many digits images",
    )
    p.add_argument(
        "--form",
        choices=sorted(FORM),
        default="data",
        help="DPM-Solver's rows in the data-prediction (dpmsolver++) or noise-prediction form",
    )
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results, report = (
        {},
        {
            "machine": machine(),
            "seeds": [seeds[0], seeds[-1]],
            "batch": args.batch,
            "form": FORM[args.form],
        },
    )
    for model in args.models:
        bench = (
            mixture_bench()
            if model == "mixture"
            else digits_bench(args.ckpt, 1.5 if "cfg" in model else 1.0)
        )
        t0 = time.perf_counter()
        ref, _ = bench.reference(seeds)
        schedule_file = args.schedule if model == "digits" else None
        results[model] = curves(bench, seeds, ref, args.batch, schedule_file, FORM[args.form])
        print(f"## {model} ({time.perf_counter() - t0:.0f} s)\n")
        table = [
            [
                name,
                r["setting"],
                f"{r['nfe']:.1f}",
                r["nfe_max"],
                f"{r['rms']:.2e}",
                f"{r['median']:.2e}",
                f"{r['p90']:.2e}",
                f"{r['p99']:.2e}",
                f"{r['max']:.2e}",
                f"{100 * r['worst1pct_share']:.0f}% @ {r['worst1pct_nfe']:.1f}",
            ]
            for name, runs in results[model].items()
            for r in runs
        ]
        print(
            markdown_table(
                [
                    "method",
                    "setting",
                    "mean NFE",
                    "max NFE",
                    "RMS",
                    "median",
                    "p90",
                    "p99",
                    "max",
                    "worst 1%: error share @ NFE",
                ],
                table,
            )
        )
        print(
            "\nAt equal mean NFE (10-30), ratio to the best plain setting at that NFE or the next above:\n"
        )
        print(
            markdown_table(
                [
                    "method",
                    "setting",
                    "mean NFE",
                    "best plain",
                    "RMS ratio",
                    "p99 ratio",
                    "median ratio",
                ],
                at_equal_nfe(results[model]),
            )
            + "\n"
        )
        report["results"] = results  # written after each model: a long run keeps what it finished
        if args.json:
            write_json(args.json, report)
        if args.plot:
            plot(results, args.plot)
    if args.throughput:
        rows = throughput(args.ckpt, args.batch, args.throughput, 1.0)
        report["throughput"] = rows
        print(markdown_table(["run", "mean NFE", "images/s"], rows))
    report["results"] = results
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot(results, args.plot)
    return report


if __name__ == "__main__":
    main()
