"""Training callbacks: EMA sample grids (PNG + logger) and the end-of-run digits FD."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from pdm.atomic import atomic_write_text
from pdm.images import grid_image, save_grid, to_uint8
from pdm.sampling import Settings, classifier_free_guidance, sample
from pdm.training.ema import EMA


def ema_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The module holding the EMA weights if an :class:`EMA` callback runs, else ``pl_module``."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA) and cb.ema_module is not None:
            return cb.ema_module
    return pl_module


DEFAULT = Settings()  # the project's default sampler


@torch.no_grad()
def sample_images(
    module: L.LightningModule,
    num: int,
    settings: Settings | None = None,
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 250,
    start_images: Tensor | None = None,
) -> tuple[Tensor, str]:
    """Sample ``num`` images in [-1, 1] from a PDMModule (labels cycle through the classes) with
    ``settings`` (default: the project's default sampler).

    A model that owns the whole schedule samples from noise. An expert samples only inside its
    own time range: the high-noise expert integrates from t = 1 down to its lowest step and
    shows its x0 prediction there; the low-noise expert starts from ``start_images`` (real
    images) noised to its highest step. Returns the images and a tag saying which was done.
    """
    net, schedule = module.net, module.schedule
    lo, hi = module.time_range
    n_steps = schedule.num_timesteps
    kw: dict = {}
    tag = "samples"
    if lo > 0:  # the high-noise expert
        kw.update(t_end=float(schedule.t_of_label(torch.tensor(float(lo)))), denoise_to_zero=True)
        tag = f"x0_at_step{lo}"
    elif hi < n_steps - 1:  # the low-noise expert
        if start_images is None:
            raise ValueError("the low-noise expert's grid starts from real images; none were given")
        kw.update(t_start=float(schedule.t_of_label(torch.tensor(float(hi)))))
        tag = f"from_data_noised_to_step{hi}"
    was_training = module.training
    module.eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, net.in_channels, net.image_size, net.image_size, generator=g)
    if start_images is not None and hi < n_steps - 1:
        t = torch.tensor(kw["t_start"], dtype=torch.float64)
        reps = start_images[torch.arange(num) % len(start_images)].cpu().float()
        noise = schedule.alpha(t).float() * reps + schedule.sigma(t).float() * noise
    fn = module.model_fn()
    if net.num_classes is not None and guidance_scale != 1.0:
        fn = classifier_free_guidance(fn, guidance_scale, net.num_classes)
    out = []
    for i in range(0, num, batch_size):
        x = noise[i : i + batch_size].to(module.device)
        kwargs = {}
        if net.num_classes is not None:
            kwargs["y"] = torch.arange(i, i + x.shape[0], device=x.device) % net.num_classes
        out.append(
            sample(
                fn,
                x,
                schedule,
                settings,
                prediction=module.hparams.target,
                model_kwargs=kwargs,
                **kw,
            ).x.cpu()
        )
    module.train(was_training)
    return torch.cat(out), tag


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving into the run's own folder: ``<default_root_dir>/checkpoints``
    unless ``dirpath`` is given. So two runs with two ``default_root_dir``s never share a folder,
    and ``--ckpt_path last`` means the latest checkpoint of this run. With ``save_last``, the
    final state is always in ``last.ckpt`` when training ends, whatever the saving interval."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _pin_folder(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._pin_folder(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._pin_folder(trainer)
        return super()._find_last_checkpoints(trainer)

    def folder(self, trainer: L.Trainer) -> str:
        """Where this run's checkpoints go."""
        self._pin_folder(trainer)
        return str(self.dirpath)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimiser steps (and at the end), sample a grid with the EMA weights.

    Samples use a fixed seed, so successive grids show the same noise as training goes on.
    Class-conditional models cycle through the labels. Grids land in ``<log_dir>/samples/``;
    an expert's grid name says what it shows (see :func:`sample_images`).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        steps: int = DEFAULT.steps,
        solver: str = DEFAULT.solver,
        order: int | None = None,
        guidance_scale: float = 1.0,
        seed: int = 0,
        scale: int = 2,
        skip_type: str = DEFAULT.grid,
    ) -> None:
        self.every_n_steps, self.num_samples, self.guidance_scale, self.seed = (
            every_n_steps,
            num_samples,
            guidance_scale,
            seed,
        )
        self.settings = Settings(steps=steps, solver=solver, order=order, grid=skip_type).resolved()
        self.scale = scale
        self.start_images: Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if (
            self.start_images is None
        ):  # a few real images, for an expert that cannot start from noise
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.start_images = x[: self.num_samples].detach().cpu().clone()

    @torch.no_grad()
    def make(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> Path | None:
        """Sample and save one grid; returns its path (rank 0 only)."""
        if not trainer.is_global_zero:
            return None
        x, kind = sample_images(
            ema_module(trainer, pl_module),
            self.num_samples,
            self.settings,
            self.guidance_scale,
            self.seed,
            start_images=self.start_images,
        )
        images = to_uint8(x)
        name = tag if kind == "samples" else f"{tag}_{kind}"
        path = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"{name}.png"
        save_grid(images, path, scale=self.scale)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(
                f"samples/{kind}", grid_image(images).transpose(2, 0, 1), trainer.global_step
            )
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        last = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else float("inf")
        if (
            self.every_n_steps > 0 and 0 < step < last and step % self.every_n_steps == 0
        ):  # the end has its own
            self.make(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.make(trainer, pl_module, "final")


class DigitsFD(L.Callback):
    """At the end of training, sample ``num_samples`` images with the EMA weights and print their
    FD-8x8 to the real digits, next to the FD of as many real digits (the floor). Written to
    ``<log_dir>/digits_fd.json`` and logged as ``fd8x8``."""

    def __init__(
        self,
        num_samples: int = 500,
        steps: int = DEFAULT.steps,
        guidance_scale: float = 1.0,
        seed: int = 1,
        solver: str = DEFAULT.solver,
        order: int | None = None,
        skip_type: str = DEFAULT.grid,
    ) -> None:
        self.num_samples, self.guidance_scale, self.seed = num_samples, guidance_scale, seed
        self.settings = Settings(steps=steps, solver=solver, order=order, grid=skip_type).resolved()
        self.enabled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Switch off, in one line, on data other than the embedded digits: their FD-8x8 to the
        digits would be a number that means nothing."""
        from pdm.data import DigitsDataModule

        data = getattr(trainer, "datamodule", None)
        if data is not None and not isinstance(data, DigitsDataModule):
            self.enabled = False
            if trainer.is_global_zero:
                print(
                    f"DigitsFD: the data are {type(data).__name__}, not the embedded digits; the "
                    "digits score is off for this run (drop pdm.training.DigitsFD from the callbacks)",
                    file=sys.stderr,
                )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from pdm.metrics import digits_fd_baseline, digits_fd_metric, fid_against

        if not trainer.is_global_zero or not self.enabled:
            return
        x, _ = sample_images(
            ema_module(trainer, pl_module),
            self.num_samples,
            self.settings,
            self.guidance_scale,
            self.seed,
        )
        stats, baseline = digits_fd_baseline(self.num_samples)
        fd = fid_against(digits_fd_metric(), stats, to_uint8(x))
        result = {
            "fd8x8": fd,
            "real_vs_real_fd8x8": baseline,
            "num_samples": self.num_samples,
            "steps": self.settings.steps,
            "solver": self.settings.solver,
            "guidance_scale": self.guidance_scale,
            "global_step": trainer.global_step,
        }
        print(
            f"digits FD-8x8 of {self.num_samples} EMA samples: {fd:.3f} "
            f"(real-vs-real with {self.num_samples} real digits: {baseline:.3f})"
        )
        atomic_write_text(
            Path(trainer.log_dir or trainer.default_root_dir) / "digits_fd.json",
            json.dumps(result, indent=1),
        )
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {"fd8x8": fd, "fd8x8_real_baseline": baseline}, step=trainer.global_step
            )
