"""A patch size for every noise level: where to split a coarse high-noise expert from a fine
low-noise one, and what the pair buys (``python -m pdm.ablation.split``).

    # 1. the split, from a patch-size ablation's held-out curves, checked by a search over splits
    python -m pdm.ablation.split --root runs/ablation --coarse 8 --fine 2 [--splits -4 -2 0 2]
    # 2. trained expert pairs (two ablation roots of experts, seed by seed) on the frontier
    python -m pdm.ablation.split --root runs/ablation --pair runs/high_p8 runs/low_p2 --out DIR

Step 1 reads the held-out error-by-noise-level curves of the ablation's runs: the split it
proposes is the lowest log SNR above which the coarse P's error exceeds the fine P's by more than
their 95% interval in every bin (below it, the coarse grid loses nothing measurable). It then
routes each seed's whole-schedule coarse and fine models at a few splits around it and scores
each routed pair on the held-out images (bits/dim) and by its sampling cost (GFLOPs per image at
the sampler given, counted per call), so the proposal is checked against what it trades.

Step 2 scores pairs of experts trained on their own noise ranges (``model.expert`` and
``model.split_log_snr``), seed i of one root with seed i of the other, the same way, and draws the
frontier: sampling GFLOPs per image against held-out bits/dim for every single P of the ablation
and for the pairs (mean and 95% interval over seeds). Writes ``split.json``, ``split.md`` and
``frontier.png`` into ``--out`` (default ``ROOT``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from pdm.ablation.stats import t_interval
from pdm.atomic import WriteError, atomic_write, atomic_write_text

LEVEL = 0.95


def runs_of(root: Path, prefix: str) -> list[Path]:
    """The run folders of one setting of an ablation, seed 0 first (``P8``, ``P8_seed1``, ...)."""
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and (p.name == prefix or p.name.startswith(f"{prefix}_seed"))
    ]
    return sorted(found, key=lambda p: 0 if p.name == prefix else int(p.name.rsplit("seed", 1)[1]))


def proposed_split(root: Path, coarse: int, fine: int) -> tuple[float | None, dict]:
    """The lowest log SNR above which the coarse P is worse than the fine P in every bin (95%,
    Welch over seeds), from the runs' cached held-out curves; and the curves' summary."""
    from pdm.ablation.report import part_points

    held, rows = {}, {}
    for p in (fine, coarse):
        for folder in runs_of(root, f"P{p}"):
            path = folder / "heldout.json"
            if not path.exists():
                raise ValueError(
                    f"{folder} has no held-out curve; run python -m pdm.ablation --report first"
                )
            held[folder.name] = json.loads(path.read_text())
            rows[folder.name] = {"value": str(p)}
    parted = part_points(held, rows, [str(fine), str(coarse)])
    entry = parted.get(str(coarse), {})
    return entry.get("above_log_snr"), entry


def _routed_denoiser(high, low, split: int):
    """The x-prediction of two models routed at discrete step ``split`` (high noise at and above)."""
    from pdm.ablation.heldout import checkpoint_denoiser

    hi, lo, schedule = checkpoint_denoiser(high), checkpoint_denoiser(low), high.schedule

    def denoise(z, t, y):
        upper = schedule.label(t.double().cpu()) >= split - 0.5
        out = torch.empty(z.shape, dtype=torch.float64)
        for mask, fn in ((upper, hi), (~upper, lo)):
            if bool(mask.any()):
                out[mask] = fn(z[mask], t[mask], None if y is None else y[mask]).cpu()
        return out

    return denoise


def pair_scores(
    high_ckpt: Path,
    low_ckpt: Path,
    split_log_snr: float | None,
    images: int,
    bins: int,
    settings,
    guidance_scale: float,
) -> dict:
    """Held-out bits/dim and sampling GFLOPs per image of two checkpoints routed at
    ``split_log_snr`` (None: where two experts meet)."""
    from pdm.ablation.heldout import NOISE_SEED, heldout_images, recorded_config
    from pdm.checkpoints.models import load_for_sampling, load_model, split_step
    from pdm.metrics.likelihood import heldout_bound

    high, low = load_model(str(high_ckpt)), load_model(str(low_ckpt))
    split = (
        high.time_range[0] if split_log_snr is None else split_step(high.schedule, split_log_snr)
    )
    x, y = heldout_images(recorded_config(high_ckpt.parents[1]))
    pick = torch.arange(images) % len(x)
    labels = y[pick] if (y is not None and high.net.num_classes is not None) else None
    bound = heldout_bound(
        _routed_denoiser(high, low, split),
        x[pick],
        high.schedule,
        labels=labels,
        num_bins=bins,
        seed=NOISE_SEED,
    )
    loaded = load_for_sampling(
        [str(high_ckpt), str(low_ckpt)], guidance_scale, split_log_snr=split_log_snr
    )
    return {"split_step": split, "bits_per_dim": bound.bits_per_dim, **_cost(loaded, settings)}


def single_scores(ckpt: Path, settings, guidance_scale: float) -> float:
    """Sampling GFLOPs per image of one whole-schedule model at ``settings``."""
    from pdm.checkpoints.models import load_for_sampling

    loaded = load_for_sampling([str(ckpt)], guidance_scale)
    return _cost(loaded, settings)["sampling_gflops_per_image"]


def _cost(loaded, settings, images: int = 4) -> dict:
    """Sample a few images at ``settings`` and count each network's calls and their FLOPs."""
    from pdm.metrics.cost import count_call_flops
    from pdm.sampling import sample

    noise = torch.randn(images, loaded.in_channels, loaded.image_size, loaded.image_size)
    kw = {"y": torch.arange(images) % loaded.num_classes} if loaded.num_classes else {}
    with torch.no_grad():
        sample(
            loaded.model_fn,
            noise,
            loaded.schedule,
            settings,
            prediction=loaded.prediction,
            model_kwargs=kw,
        )
    count_call_flops(loaded.experts)
    return loaded.network_record(images)


def _summary(values: list[float]) -> dict:
    mean, half = t_interval(values, LEVEL)
    return {"values": values, "mean": mean, "half_width": half}


def _pm(entry: dict, fmt: str = ".4g") -> str:
    half = entry["half_width"]
    return format(entry["mean"], fmt) + ("" if half != half else f" ± {format(half, fmt)}")


def _parser():
    from pdm.cli import parser
    from pdm.sampling import Settings

    p = parser(__doc__, prog="python -m pdm.ablation.split")
    a = p.add_argument
    a("--root", required=True, help="a patch-size ablation's folder (P{p}[_seed{s}] runs)")
    a("--coarse", type=int, default=8, help="the high-noise expert's patch size")
    a("--fine", type=int, default=2, help="the low-noise expert's patch size")
    a("--splits", type=float, nargs="*", default=None, help="log SNRs to search")
    a(
        "--pair",
        nargs=2,
        metavar=("HIGH_ROOT", "LOW_ROOT"),
        default=None,
        help="ablation roots of trained high- and low-noise experts, seeds paired",
    )
    a("--out", default=None, help="where split.json/.md and frontier.png go (default ROOT)")
    a("--steps", type=int, default=Settings().steps, help="the sampler's steps (default sampler)")
    a("--guidance-scale", type=float, default=1.0, help="guidance of the sampling cost")
    a("--heldout-images", type=int, default=128)
    a("--bins", type=int, default=20)
    return p


def _singles(root: Path, settings, guidance_scale: float) -> dict:
    """Each patch size of the ablation alone: held-out bits/dim over seeds, sampling GFLOPs."""
    singles: dict = {}
    for folder in sorted(root.glob("P*")):
        if not (folder / "heldout.json").exists():
            continue
        pvalue = folder.name.split("_")[0][1:]
        held = json.loads((folder / "heldout.json").read_text())
        singles.setdefault(pvalue, {"bits": [], "gflops": None})
        singles[pvalue]["bits"].append(held["bits_per_dim"])
        if singles[pvalue]["gflops"] is None:
            singles[pvalue]["gflops"] = single_scores(
                folder / "checkpoints" / "last.ckpt", settings, guidance_scale
            )
    return {
        k: {"bits_per_dim": _summary(v["bits"]), "sampling_gflops_per_image": v["gflops"]}
        for k, v in sorted(singles.items(), key=lambda kv: int(kv[0]))
    }


def _scored_pairs(highs: list[Path], lows: list[Path], split, args, settings) -> dict:
    """Seed i of the high-noise runs with seed i of the low-noise runs, routed at ``split``."""
    scores = [
        pair_scores(
            h / "checkpoints" / "last.ckpt",
            lo / "checkpoints" / "last.ckpt",
            split,
            args.heldout_images,
            args.bins,
            settings,
            args.guidance_scale,
        )
        for h, lo in zip(highs, lows)
    ]
    return {
        "split_step": scores[0]["split_step"],
        "bits_per_dim": _summary([x["bits_per_dim"] for x in scores]),
        "sampling_gflops_per_image": scores[0]["sampling_gflops_per_image"],
        "experts": scores[0]["experts"],
    }


def main(argv: list[str] | None = None) -> dict | None:
    """Propose and check the split, or score trained pairs on the frontier."""
    from pdm.cli import fail
    from pdm.sampling import Settings

    args = _parser().parse_args(argv)
    try:
        root = Path(args.root)
        settings = Settings(steps=args.steps).resolved()
        proposal, curve = proposed_split(root, args.coarse, args.fine)
        report: dict = {
            "root": str(root),
            "coarse": args.coarse,
            "fine": args.fine,
            "proposed_log_snr": proposal,
            "curve": curve,
            "sampler": {
                "steps": settings.steps,
                "solver": settings.solver,
                "guidance_scale": args.guidance_scale,
            },
            "single": _singles(root, settings, args.guidance_scale),
            "search": {},
        }
        fine_runs, coarse_runs = runs_of(root, f"P{args.fine}"), runs_of(root, f"P{args.coarse}")
        centre = proposal if proposal is not None else 0.0
        for s in args.splits or [round(centre + d, 2) for d in (-4.0, -2.0, 0.0, 2.0)]:
            found = _scored_pairs(coarse_runs, fine_runs, s, args, settings)
            report["search"][str(s)] = found
            print(
                f"split {s}: {_pm(found['bits_per_dim'])} bits/dim, "
                f"{found['sampling_gflops_per_image']:.3g} GFLOPs/image",
                file=sys.stderr,
            )
        if args.pair is not None:
            highs = runs_of(Path(args.pair[0]), f"P{args.coarse}")
            lows = runs_of(Path(args.pair[1]), f"P{args.fine}")
            if not highs or len(highs) != len(lows):
                raise ValueError(
                    f"--pair needs as many P{args.coarse} high-noise runs as P{args.fine} "
                    "low-noise ones"
                )
            report["pair"] = _scored_pairs(highs, lows, None, args, settings)
        return _write(report, Path(args.out or root))
    except (ValueError, WriteError) as e:
        fail("python -m pdm.ablation.split", str(e))


def _write(report: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "split.json", json.dumps(report, indent=1, default=str))
    text = markdown(report)
    atomic_write_text(out / "split.md", text)
    frontier_plot(report, out / "frontier.png")
    print(text)
    return report


def markdown(report: dict) -> str:
    """The split's evidence and the frontier as Markdown."""
    c, f = report["coarse"], report["fine"]
    prop = report["proposed_log_snr"]
    lines = [
        f"Coarse P = {c} (high noise), fine P = {f} (low noise); sampler: {report['sampler']['solver']}, "
        f"{report['sampler']['steps']} steps, guidance {report['sampler']['guidance_scale']}.",
        "",
        f"Proposed split (curves): log SNR {prop:.2f} (SNR {math.exp(prop):.3g})"
        if prop is not None
        else "Proposed split (curves): none: the coarse P is not worse in the lowest-noise bin",
        "",
        "| model | split (log SNR) | held-out bits/dim | sampling GFLOPs/image |",
        "|---|---|---|---|",
    ]
    for p, e in report["single"].items():
        lines.append(
            f"| P = {p} alone | – | {_pm(e['bits_per_dim'])} | {e['sampling_gflops_per_image']:.3g} |"
        )
    for s, e in report["search"].items():
        lines.append(
            f"| P = {c} / P = {f}, whole-schedule models routed | {s} (step {e['split_step']}) | "
            f"{_pm(e['bits_per_dim'])} | {e['sampling_gflops_per_image']:.3g} |"
        )
    if "pair" in report:
        e = report["pair"]
        lines.append(
            f"| P = {c} / P = {f} experts, trained on their ranges | step {e['split_step']} | "
            f"{_pm(e['bits_per_dim'])} | {e['sampling_gflops_per_image']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def frontier_plot(report: dict, path: Path) -> None:
    """Sampling GFLOPs per image against held-out bits/dim (mean, 95% interval over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))

    def point(x, e, label, marker):
        half = e["half_width"] if e["half_width"] == e["half_width"] else 0.0
        ax.errorbar([x], [e["mean"]], yerr=[half], marker=marker, capsize=3, label=label, ls="none")

    for p, e in report["single"].items():
        point(e["sampling_gflops_per_image"], e["bits_per_dim"], f"P = {p}", "o")
    for s, e in report["search"].items():
        point(
            e["sampling_gflops_per_image"],
            e["bits_per_dim"],
            f"P{report['coarse']}/P{report['fine']} routed at {s}",
            "s",
        )
    if "pair" in report:
        point(
            report["pair"]["sampling_gflops_per_image"],
            report["pair"]["bits_per_dim"],
            f"P{report['coarse']}/P{report['fine']} experts",
            "*",
        )
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("sampling GFLOPs per image (counted per call)")
    ax.set_ylabel("held-out bits/dim (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
