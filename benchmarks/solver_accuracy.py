"""Error against a high-accuracy solve versus NFE, for each solver, on two models.

    python benchmarks/solver_accuracy.py [--ckpt runs/digits/.../last.ckpt]

Models: the exact noise predictor of a Gaussian mixture (no training, closed form) and the
trained digits model (if a checkpoint is found). Reference: 333 third-order singlestep
steps (999 evaluations) in float64. Metric: RMS error per pixel of the final sample.
Writes benchmarks/results/solver_accuracy.{json,png} and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    HERE, digits_model, find_digits_checkpoint, markdown_table, mixture_model, save_results,
)
from pdm.sampling import sample  # noqa: E402

NFES = (5, 10, 15, 20, 25)
SOLVERS = {
    "DDIM": dict(solver="ddim"),
    "DPM-Solver++(2M)": dict(solver="dpmsolver++", order=2),
    "DPM-Solver++(3M)": dict(solver="dpmsolver++", order=3),
    "DPM-Solver-3 (singlestep)": dict(solver="dpmsolver", order=3, method="singlestep"),
}
ADAPTIVE_TOLERANCES = ((0.05, 0.0078), (0.02, 0.003), (0.01, 0.0015), (0.005, 0.0008))


def run(model, skip_type: str) -> dict:
    fn, schedule, noise, name, prediction, kwargs = model
    kw = dict(prediction=prediction, model_kwargs=kwargs, skip_type=skip_type)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = sample(fn, noise, schedule, steps=999, solver="dpmsolver", order=3, method="singlestep_fixed", **kw).x
        ref_seconds = time.perf_counter() - t0
        rms = lambda x: float((x - ref).pow(2).mean().sqrt())  # noqa: E731
        out = {"model": name, "skip_type": skip_type, "reference_seconds": ref_seconds, "curves": {}}
        for label, cfg in SOLVERS.items():
            out["curves"][label] = [(n, rms(sample(fn, noise, schedule, steps=n, **cfg, **kw).x)) for n in NFES]
        adaptive = []
        for rtol, atol in ADAPTIVE_TOLERANCES:
            res = sample(fn, noise, schedule, solver="dpmsolver++", order=3, method="adaptive", rtol=rtol, atol=atol, **kw)
            adaptive.append((res.nfe, rms(res.x)))
        out["curves"]["DPM-Solver-23 (adaptive)"] = adaptive
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        for label, pts in r["curves"].items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS error vs 999-NFE reference")
        ax.set_title(f"{r['model']} ({r['skip_type']} grid)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="digits checkpoint (default: newest runs/digits/**/last.ckpt)")
    p.add_argument("--skip-type", default="logSNR")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    models = [mixture_model()]
    ckpt = find_digits_checkpoint(args.ckpt)
    if ckpt:
        models.append(digits_model(ckpt))
    else:
        print("no digits checkpoint found: run `python train.py fit --config configs/digits.yaml` first", file=sys.stderr)
    results = [run(m, args.skip_type) for m in models]
    save_results(args.out, "solver_accuracy", results, plot)
    for r in results:
        print(f"### {r['model']} ({r['skip_type']} grid), RMS error vs 999-NFE reference\n")
        rows = [[label] + [f"{e:.2e}" for _, e in pts] for label, pts in r["curves"].items() if "adaptive" not in label]
        print(markdown_table(["solver"] + [f"NFE {n}" for n in NFES], rows))
        ad = r["curves"]["DPM-Solver-23 (adaptive)"]
        print("\nDPM-Solver-23 (adaptive), (rtol, atol) -> NFE, error: " + "; ".join(
            f"({rt}, {at}) -> {n:.0f}, {e:.2e}" for (rt, at), (n, e) in zip(ADAPTIVE_TOLERANCES, ad)) + "\n")


if __name__ == "__main__":
    main()
