"""Adaptive step skipping: NFE against quality, compared at equal NFE with fewer solver steps
and with the greedy optimal skip path.

    python benchmarks/skip_tradeoff.py [--ckpt runs/digits/.../last.ckpt] [--greedy-budget 24]

For each model (exact Gaussian mixture; trained digits model if found) and solver (DDIM,
DPM-Solver++(2M)) at 50 steps: the full 50-step output of each seed is the reference. Then
  - adaptive skipping, per-sample, over a sweep of thresholds (max_skips 4, warm-up 4);
  - plain sampling with fewer steps (NFE = steps);
  - the greedy path (best skip added one at a time) for 1..budget skips.
Quality: PSNR (data range 2) and, for images, SSIM against the reference; LPIPS is left out
offline (its weights must be downloaded). Writes benchmarks/results/skip_tradeoff.{json,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    HERE, digits_model, find_digits_checkpoint, machine, markdown_table, mixture_model, save_results, write_json,
)
from pdm.sampling import AdaptiveSkip, greedy_skip_path, sample  # noqa: E402

STEPS = 50
THRESHOLDS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0)
FEWER_STEPS = (13, 15, 18, 22, 26, 30, 35, 40, 45)
SOLVERS = {"DDIM": dict(solver="ddim"), "DPM-Solver++(2M)": dict(solver="dpmsolver++", order=2)}


def quality(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Mean per-image PSNR (data range 2, i.e. images in [-1, 1]) and SSIM for image-sized inputs."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    x, ref = x.float().clamp(-1, 1), ref.float().clamp(-1, 1)
    psnr = peak_signal_noise_ratio(x, ref, data_range=2.0, reduction="none", dim=(1, 2, 3)).mean().item()
    out = {"psnr": psnr}
    if x.shape[-1] >= 16:
        out["ssim"] = structural_similarity_index_measure(x, ref, data_range=2.0, kernel_size=7).item()
    return out


def run(model, solver_name: str, greedy_budget: int) -> dict:
    fn, schedule, noise, name, prediction, kwargs = model
    kw = dict(prediction=prediction, model_kwargs=kwargs, **SOLVERS[solver_name])
    with torch.no_grad():
        ref = sample(fn, noise, schedule, steps=STEPS, **kw).x
        rows = {"adaptive": [], "fewer_steps": [], "greedy": []}
        for thr in THRESHOLDS:
            res = sample(fn, noise, schedule, steps=STEPS, skip=AdaptiveSkip(threshold=thr, max_skips=4, warmup=4), **kw)
            rows["adaptive"].append({"threshold": thr, "nfe": res.nfe, **quality(res.x, ref)})
        for n in FEWER_STEPS:
            res = sample(fn, noise, schedule, steps=n, **kw)
            rows["fewer_steps"].append({"steps": n, "nfe": res.nfe, **quality(res.x, ref)})
        t0 = time.perf_counter()
        if greedy_budget:
            for path, _ in greedy_skip_path(fn, noise, schedule, budget=greedy_budget, steps=STEPS, **kw):
                x = sample(fn, noise, schedule, steps=STEPS, skip=path, **kw).x
                rows["greedy"].append({"skips": STEPS - sum(path.evaluate), "nfe": float(sum(path.evaluate)), **quality(x, ref)})
    return {"model": name, "solver": solver_name, "steps": STEPS, "rows": rows, "greedy_seconds": time.perf_counter() - t0}


def at_equal_nfe(result: dict) -> list[list]:
    """For each adaptive point: PSNR of fewer steps and of the greedy path at the nearest NFE."""
    table = []
    for a in result["rows"]["adaptive"]:
        fewer = min(result["rows"]["fewer_steps"], key=lambda r: abs(r["nfe"] - a["nfe"]))
        greedy = [g for g in result["rows"]["greedy"] if abs(g["nfe"] - a["nfe"]) <= 0.5 + 1e-9]
        g_psnr = f"{greedy[0]['psnr']:.1f} (NFE {greedy[0]['nfe']:.0f})" if greedy else "-"
        table.append([a["threshold"], f"{a['nfe']:.1f}", f"{a['psnr']:.1f}", f"{a.get('ssim', float('nan')):.3f}",
                      f"{fewer['psnr']:.1f} (NFE {fewer['nfe']:.0f})", g_psnr])
    return table


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for key, style in (("adaptive", "o-"), ("fewer_steps", "s--"), ("greedy", "^:")):
            pts = sorted((row["nfe"], row["psnr"]) for row in r["rows"][key])
            if pts:
                ax.plot([p[0] for p in pts], [min(p[1], 80) for p in pts], style, label=key.replace("_", " "))
        ax.set_xlabel("NFE (of 50 steps)")
        ax.set_ylabel("PSNR vs full 50-step output (dB)")
        ax.set_title(f"{r['model']}, {r['solver']}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--greedy-budget", type=int, default=30, help="skips for the greedy path on the mixture")
    p.add_argument("--digits-greedy-budget", type=int, default=15, help="greedy skips on the digits model (costly on CPU)")
    p.add_argument("--digits-seeds", type=int, default=4, help="seeds (images) per digits run; the greedy search dominates")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    models = [(mixture_model(), args.greedy_budget)]
    ckpt = find_digits_checkpoint(args.ckpt)
    if ckpt:
        models.append((digits_model(ckpt, num=args.digits_seeds), args.digits_greedy_budget))
    else:
        print("no digits checkpoint found: run `python train.py fit --config configs/digits.yaml` first", file=sys.stderr)
    results = []
    for model, budget in models:
        for solver_name in SOLVERS:
            print(f"running {model[3]} / {solver_name} ...", file=sys.stderr, flush=True)
            results.append(run(model, solver_name, budget))
            write_json(Path(args.out) / "skip_tradeoff.json", {"machine": machine(), "results": results, "partial": True})
    save_results(args.out, "skip_tradeoff", results, plot)
    for r in results:
        print(f"### {r['model']}, {r['solver']}, 50 steps: adaptive skipping vs equal-NFE alternatives (PSNR dB)\n")
        print(markdown_table(["threshold", "NFE", "PSNR", "SSIM", "fewer steps PSNR", "greedy path PSNR"], at_equal_nfe(r)))
        print()


if __name__ == "__main__":
    main()
