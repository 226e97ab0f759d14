"""Each ablation run scored on images its training never saw: the x-prediction's error by noise
level and the variational bound in bits/dim (:func:`pdm.metrics.likelihood.heldout_bound`), from
the run's final EMA weights, on its data module's held-out (validation) set, with fixed noise."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
import yaml
from torch import Tensor

from pdm.atomic import atomic_write_text
from pdm.metrics.likelihood import Denoiser

NOISE_SEED = 0  # the same noise for every run: differences between runs are not noise draws


def recorded_config(folder: Path) -> dict:
    """The config a run trained with, as train.py recorded it (its newest ``config.yaml``)."""
    found = sorted(folder.rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ValueError(f"{folder} holds no config.yaml: it is not a train.py run folder")
    return yaml.safe_load(found[-1].read_text())


def heldout_images(config: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The held-out images (and labels, or None) of a run's data module: its validation set."""
    section = config.get("data") or {}
    module, _, name = (section.get("class_path") or "").rpartition(".")
    data = getattr(importlib.import_module(module), name)(**(section.get("init_args") or {}))
    data.setup("fit")
    if data.val_set is None or len(data.val_set) == 0:
        raise ValueError(
            f"{name} holds no held-out images to score the run on; set data.init_args.val_fraction "
            "(e.g. 0.05) so that part of the data is never trained on"
        )
    xs, ys = zip(*(data.val_set[i] for i in range(len(data.val_set))))
    x = torch.stack([torch.as_tensor(v) for v in xs]).float()
    y = torch.as_tensor([int(v) for v in ys])
    return x, (None if bool((y < 0).all()) else y)


def heldout(run, images: int = 256, bins: int = 24) -> dict | None:
    """The run's held-out curve and bits/dim (cached in ``FOLDER/heldout.json`` for its final
    checkpoint and these settings); None while the run has no checkpoint."""
    from pdm.checkpoints.models import load_model
    from pdm.metrics.likelihood import heldout_bound

    folder = Path(run.folder if hasattr(run, "folder") else run)
    ckpt = folder / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        return None
    key = {
        "checkpoint_mtime_ns": ckpt.stat().st_mtime_ns,
        "images": images,
        "bins": bins,
        "noise_seed": NOISE_SEED,
    }
    cache = folder / "heldout.json"
    if cache.exists():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return saved
        except json.JSONDecodeError:
            pass  # a damaged cache is recomputed
    model = load_model(str(ckpt))
    if model.time_range != (0, model.schedule.num_timesteps - 1):
        print(
            f"ablation: {folder.name}: an expert (steps {model.time_range[0]}..{model.time_range[1]}) "
            "has no bound alone; score the pair with python -m pdm.ablation.split --pair",
            file=sys.stderr,
        )
        return None
    try:
        x, y = heldout_images(recorded_config(folder))
    except ValueError as e:  # a missing score, not a failed run: the report shows a dash
        print(f"ablation: {folder.name}: no held-out bound: {e}", file=sys.stderr)
        return None
    pick = torch.arange(images) % len(x)  # the held-out set in turn, fresh noise each time
    labels = y[pick] if (y is not None and model.net.num_classes is not None) else None
    with torch.no_grad():
        bound = heldout_bound(
            checkpoint_denoiser(model),
            x[pick],
            model.schedule,
            labels=labels,
            num_bins=bins,
            seed=NOISE_SEED,
        )
    out = {
        "key": key,
        "held_out_images": len(x),
        "conditional": labels is not None,
        "target": model.target,
        **bound.to_dict(),
    }
    atomic_write_text(cache, json.dumps(out, indent=1))
    print(
        f"ablation: {folder.name}: held-out bound {bound.bits_per_dim:.4f} bits/dim "
        f"({images} evaluations of {len(x)} held-out images)",
        file=sys.stderr,
    )
    return out


def checkpoint_denoiser(model) -> Denoiser:
    """The x-prediction of a loaded :class:`pdm.checkpoints.models.Model` (EMA weights) at
    continuous times, whatever its target (eps, x0, v), as sampling would see it."""
    from pdm.checkpoints.models import network_model_fn
    from pdm.objectives import to_x0

    fn = network_model_fn(model.net, model.schedule)
    schedule, target = model.schedule, model.target

    def denoise(z: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        raw = fn(z, t, y) if y is not None else fn(z, t)
        tt = t.double().cpu()
        a, s = schedule.alpha(tt).to(z.device), schedule.sigma(tt).to(z.device)
        return to_x0(raw.double(), z.double(), a, s, target)

    return denoise
