"""Helpers shared by the benchmark scripts: models to test on, tables and plots."""

from __future__ import annotations

import glob
import json
import os
import platform
from pathlib import Path

import torch

from pdm.testing import GaussianMixture
from pdm.schedule import VPSchedule

HERE = Path(__file__).resolve().parent


def machine() -> str:
    """A one-line description of where a benchmark ran."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def mixture_model(prediction: str = "eps"):
    """(model_fn, schedule, noise, name) for the exact Gaussian-mixture model on 3x8x8 'images'."""
    schedule = VPSchedule.linear()
    gm = GaussianMixture.random(components=8, shape=(3, 8, 8), std=0.25, seed=0)
    noise = torch.randn(64, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return gm.model_fn(schedule, prediction), schedule, noise, "gaussian_mixture", prediction, {}


def find_digits_checkpoint(explicit: str | None = None) -> str | None:
    """The given checkpoint, else the newest ``last.ckpt`` of the digits run, else None."""
    if explicit:
        return explicit
    found = sorted(glob.glob("runs/digits/**/last.ckpt", recursive=True), key=os.path.getmtime)
    return found[-1] if found else None


def digits_model(ckpt: str, num: int = 32):
    """(model_fn, schedule, noise, name, prediction, kwargs) for a trained digits checkpoint."""
    from pdm.checkpoints import load_for_sampling

    loaded = load_for_sampling([ckpt])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(num, loaded.in_channels, loaded.image_size, loaded.image_size, generator=g, dtype=torch.float64)
    kwargs = {}
    if loaded.num_classes is not None:
        kwargs["y"] = torch.arange(num) % loaded.num_classes
    return loaded.model_fn, loaded.schedule, noise, "digits", loaded.prediction, kwargs


def write_json(path: Path, data) -> None:
    """Save results as JSON next to the plot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def save_results(out_dir: str | Path, name: str, results: list, plot) -> None:
    """Write ``<name>.json`` and ``<name>.png`` under ``out_dir`` and print the machine line."""
    out = Path(out_dir)
    write_json(out / f"{name}.json", {"machine": machine(), "results": results})
    plot(results, out / f"{name}.png")
    print(f"machine: {machine()}\n")
