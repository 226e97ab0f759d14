"""The report of a patch-size ablation (:mod:`pdm.ablation`), drawn from its runs' quality logs and
checkpoints: a table (Markdown and JSON), quality against steps, FLOPs and wall time, and the
final samples of every P side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pdm.ablation.configs import batch_size
from pdm.ablation.cost import device_name, step_cost
from pdm.atomic import atomic_write, atomic_write_text


def read_quality(folder: Path) -> list[dict]:
    """The quality checks of one run, one per step (a resumed run's repeat of a step wins)."""
    path = folder / "quality.jsonl"
    if not path.exists():
        return []
    by_step = {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a check cut off by a kill or a full disk: not scored
                break
            raise ValueError(f"{path}: line {i + 1} is not a quality record") from None
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def write_report(config: dict, runs: dict[int, dict], args) -> dict:
    """ROOT/ablation.{md,json,png} and ROOT/samples.png; returns the table as a dict."""
    root = Path(args.root)
    rows, curves = {}, {}
    for p, run in runs.items():
        checks = read_quality(run["folder"])
        curves[p] = checks
        name = next((k for k in ("fd8x8", "fid") if checks and k in checks[-1]), "score")
        last = checks[-1] if checks else {}
        rows[p] = {
            **step_cost(config, p),
            "steps": last.get("step"),
            "train_flops": last.get("train_flops"),
            "train_seconds": last.get("train_seconds"),
            "checks": len(checks),
            "metric": name,
            "best": min((c[name] for c in checks), default=None),
            "final": last.get(name),
        }
    report = {
        "config": args.config,
        "budget": list(args.budget),
        "device": device_name(),
        "batch_size": batch_size(config),
        "runs": rows,
        "curves": curves,
    }
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "ablation.json", json.dumps(report, indent=1, default=str))
    table = markdown(rows, args.budget, report["device"], report["batch_size"])
    atomic_write_text(root / "ablation.md", table)
    plot(curves, root / "ablation.png")
    samples_side_by_side(runs, root / "samples.png")
    print(table)
    return report


def markdown(rows: dict[int, dict], budget, device: str, batch: int) -> str:
    """The table of the report."""
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    cuda = any(r.get("peak_cuda_mib") is not None for r in rows.values())
    head = (
        f"| P | parameters | s/step | ms/image | activations MiB | {'peak MiB | ' if cuda else ''}"
        "steps | training FLOPs | train s | checks | best | final |\n"
        f"|{'---|' * (12 if cuda else 11)}\n"
    )
    body = "".join(
        f"| {p} | {r['parameters'] / 1e6:.2f}M | {r['seconds_per_step']:.3f} | "
        f"{r['train_ms_per_image']:.2f} | {r['activation_mib']:.1f} | "
        + (f"{fmt(r['peak_cuda_mib'], '.0f')} | " if cuda else "")
        + f"{fmt(r['steps'], 'd')} | {fmt(r['train_flops'], '.3g')} | "
        f"{fmt(r['train_seconds'], '.0f')} | {r['checks']} | {fmt(r['best'], '.4g')} | "
        f"{fmt(r['final'], '.4g')} |\n"
        for p, r in sorted(rows.items())
    )
    metric = next(iter(rows.values()))["metric"]
    return (
        f"Budget: {budget[0]} {budget[1]}; score: {metric} (lower is better). Step cost measured at "
        f"batch {batch} on {device} when the report was written; steps, FLOPs and seconds are the "
        "runs' own.\n\n" + head + body
    )


def plot(curves: dict[int, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for p, checks in sorted(curves.items()):
        if not checks:
            continue
        name = "fd8x8" if "fd8x8" in checks[0] else "fid"
        score = [c[name] for c in checks]
        for ax, key in zip(axes, ("step", "train_flops", "train_seconds")):
            ax.plot([c[key] for c in checks], score, marker="o", label=f"P = {p}")
    for ax, label in zip(
        axes, ("optimiser steps", "training FLOPs (counted)", "training wall seconds")
    ):
        ax.set_xlabel(label), ax.set_ylabel("score (lower is better)"), ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1:]:  # the patch sizes' costs span more than an order of magnitude
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def samples_side_by_side(runs: dict[int, dict], path: Path, num: int = 16) -> None:
    """Each P's final EMA samples (the same noise), one panel per P, left to right."""
    from PIL import Image, ImageDraw

    from pdm.checkpoints import load_for_sampling
    from pdm.images import grid_image, to_uint8
    from pdm.sampling import Settings, sample

    panels = []
    for p, run in sorted(runs.items()):
        ckpt = run["folder"] / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            continue
        loaded = load_for_sampling([str(ckpt)])
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(
            num, loaded.in_channels, loaded.image_size, loaded.image_size, generator=g
        )
        kw = {"y": torch.arange(num) % loaded.num_classes} if loaded.num_classes else {}
        with torch.no_grad():
            x = sample(
                loaded.model_fn,
                noise,
                loaded.schedule,
                Settings(steps=20),
                prediction=loaded.prediction,
                model_kwargs=kw,
            ).x
        image = Image.fromarray(np.squeeze(grid_image(to_uint8(x))))
        image = image.resize((image.width * 2, image.height * 2), Image.NEAREST).convert("RGB")
        canvas = Image.new("RGB", (image.width, image.height + 14), "white")
        canvas.paste(image, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), f"P = {p}", fill="black")
        panels.append(canvas)
    if not panels:
        return
    out = Image.new(
        "RGB",
        (sum(p.width for p in panels) + 8 * (len(panels) - 1), max(p.height for p in panels)),
        "white",
    )
    x0 = 0
    for panel in panels:
        out.paste(panel, (x0, 0))
        x0 += panel.width + 8
    atomic_write(path, lambda tmp: out.save(tmp, format="PNG"))
