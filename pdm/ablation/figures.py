"""The figures of an ablation's report: quality along training, the held-out error by noise level
(the PDM paper's figure) and each value's final samples side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pdm.ablation.stats import t_interval
from pdm.atomic import atomic_write

LEVEL = 0.95


def plot(curves: dict[str, list[dict]], rows: dict[str, dict], path: Path) -> None:
    """Quality along training against steps, FLOPs and seconds, one colour per value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours: dict[str, str] = {}
    for label, checks in curves.items():
        if not checks:
            continue
        value = str(rows[label]["value"])
        name = "fd8x8" if "fd8x8" in checks[0] else "fid"
        score = [c[name] for c in checks]
        for ax, key in zip(axes, ("step", "train_flops", "train_seconds")):
            kw = {"color": colours[value]} if value in colours else {"label": value}
            (line,) = ax.plot([c[key] for c in checks], score, marker="o", ms=3, alpha=0.8, **kw)
        colours.setdefault(value, line.get_color())
    for ax, label in zip(
        axes, ("optimiser steps", "training FLOPs (counted)", "training wall seconds")
    ):
        ax.set_xlabel(label), ax.set_ylabel("score (lower is better)"), ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1:]:  # the patch sizes' costs span more than an order of magnitude
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if colours:
        axes[0].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_noise_levels(
    held: dict, rows: dict[str, dict], values: list[str], parting: dict, key: str, path: Path
) -> None:
    """The PDM paper's figure: held-out RMSE of the x-prediction against log SNR, one curve per
    value (mean over seeds, 95% band), and each value's ratio to the reference value's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {}
    for label, h in held.items():
        if h is not None:
            curves.setdefault(str(rows[label]["value"]), []).append(np.asarray(h["rmse"]))
    if not curves:
        return
    edges = np.asarray(next(h for h in held.values() if h is not None)["log_snr_edges"])
    centres = 0.5 * (edges[1:] + edges[:-1])
    name = "P" if key == "patch_size" else key
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    ref = np.stack(curves[values[0]]).mean(0) if values[0] in curves else None
    for v in values:
        if v not in curves:
            continue
        c = np.stack(curves[v])
        mean = c.mean(0)
        half = np.array([t_interval(c[:, k], LEVEL)[1] for k in range(c.shape[1])])
        (line,) = left.plot(centres, mean, marker="o", ms=3, label=f"{name} = {v} ({len(c)} seeds)")
        if len(c) > 1:
            left.fill_between(centres, mean - half, mean + half, color=line.get_color(), alpha=0.2)
        if ref is not None:
            right.plot(centres, mean / ref, color=line.get_color(), marker="o", ms=3)
            if len(c) > 1:
                right.fill_between(
                    centres,
                    (mean - half) / ref,
                    (mean + half) / ref,
                    color=line.get_color(),
                    alpha=0.2,
                )
            above = (parting.get(v) or {}).get("above_log_snr")
            if above is not None:
                right.axvline(above, color=line.get_color(), ls="--", lw=1)
    left.set_yscale("log")
    left.set_ylabel("held-out RMSE of the x-prediction")
    right.set_ylabel(f"RMSE / RMSE at {name} = {values[0]}")
    right.axhline(1.0, color="grey", lw=0.8)
    for ax in (left, right):
        ax.set_xlabel("log SNR (high noise on the left)")
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.set_title("dashed: above it, worse in every bin (95%)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def samples_side_by_side(runs: list, path: Path, num: int = 16) -> None:
    """Each value's final EMA samples (the same noise), one panel per value, left to right."""
    from PIL import Image, ImageDraw

    from pdm.checkpoints import load_for_sampling
    from pdm.images import grid_image, to_uint8
    from pdm.sampling import Settings, sample

    panels = []
    for run in runs:
        ckpt = run.folder / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            continue
        try:
            loaded = load_for_sampling([str(ckpt)])
        except ValueError:  # an expert alone makes no finished image
            continue
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
        name = "P" if run.key == "patch_size" else run.key.split(".")[-1]
        ImageDraw.Draw(canvas).text((2, 1), f"{name} = {run.value}", fill="black")
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
