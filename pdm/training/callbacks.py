"""Training callbacks: EMA sample grids written as PNG and sent to the logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from pdm.images import save_grid, to_uint8
from pdm.sampling import sample
from pdm.training.ema import EMA


def ema_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The module holding the EMA weights if an :class:`EMA` callback runs, else ``pl_module``."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA) and cb.ema_module is not None:
            return cb.ema_module
    return pl_module


@torch.no_grad()
def sample_images(module: L.LightningModule, num: int, steps: int = 20, solver: str = "dpmsolver++", order: int = 2,
                  guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 250) -> torch.Tensor:
    """Sample ``num`` images in [-1, 1] from a PDMModule (labels cycle through the classes)."""
    from pdm.sampling import classifier_free_guidance

    hp = module.hparams
    was_training = module.training
    module.eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, hp.in_channels, hp.image_size, hp.image_size, generator=g)
    fn = module.model_fn()
    if hp.num_classes is not None and guidance_scale != 1.0:
        fn = classifier_free_guidance(fn, guidance_scale, hp.num_classes)
    out = []
    for i in range(0, num, batch_size):
        x = noise[i : i + batch_size].to(module.device)
        kwargs = {}
        if hp.num_classes is not None:
            kwargs["y"] = torch.arange(i, i + x.shape[0], device=x.device) % hp.num_classes
        res = sample(fn, x, module.schedule, steps=steps, solver=solver, order=order, prediction=hp.target,
                     model_kwargs=kwargs)
        out.append(res.x.cpu())
    module.train(was_training)
    return torch.cat(out)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimiser steps (and at the end), sample a grid with the EMA weights.

    Samples use a fixed seed, so successive grids show the same noise as training goes on.
    Class-conditional models cycle through the labels. Grids land in ``<log_dir>/samples/``.
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 64, steps: int = 20, solver: str = "dpmsolver++",
                 order: int = 2, guidance_scale: float = 1.0, seed: int = 0, scale: int = 2) -> None:
        self.every_n_steps, self.num_samples, self.steps = every_n_steps, num_samples, steps
        self.solver, self.order, self.guidance_scale, self.seed, self.scale = solver, order, guidance_scale, seed, scale

    @torch.no_grad()
    def make(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> Path | None:
        """Sample and save one grid; returns its path (rank 0 only)."""
        if not trainer.is_global_zero:
            return None
        x = sample_images(ema_module(trainer, pl_module), self.num_samples, self.steps, self.solver, self.order,
                          self.guidance_scale, self.seed)
        images = to_uint8(x)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        path = out_dir / f"{tag}.png"
        save_grid(images, path, scale=self.scale)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples", _grid_chw(images), trainer.global_step)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.make(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.make(trainer, pl_module, "final")


def _grid_chw(images):
    from pdm.images import make_grid

    return make_grid(images).transpose(2, 0, 1)
