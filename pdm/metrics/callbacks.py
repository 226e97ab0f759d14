"""A training callback that reports the digits FD at the end of a run, beside its real-vs-real floor."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch

from pdm.images import to_uint8
from pdm.metrics.features import digits_fd_metric, digits_reference_images
from pdm.metrics.fid import FeatureStats, compute_stats, fid_against
from pdm.training.callbacks import ema_module, sample_images


def digits_fd_baseline(num: int, seed: int = 0) -> tuple[FeatureStats, float]:
    """Reference statistics of all digits, and the FD of ``num`` random real digits to them
    (what a perfect model would score with ``num`` samples)."""
    ref_images = digits_reference_images().numpy()
    metric = digits_fd_metric()
    stats = compute_stats(metric, ref_images)
    idx = torch.randperm(len(ref_images), generator=torch.Generator().manual_seed(seed))[:num].numpy()
    return stats, fid_against(metric, stats, ref_images[idx])


class DigitsFD(L.Callback):
    """At the end of training, sample ``num_samples`` images with the EMA weights and print their
    FD-8x8 to the real digits, next to the FD of as many real digits (the floor). Written to
    ``<log_dir>/digits_fd.json`` and logged as ``fd8x8``."""

    def __init__(self, num_samples: int = 500, steps: int = 20, guidance_scale: float = 1.0, seed: int = 1) -> None:
        self.num_samples, self.steps, self.guidance_scale, self.seed = num_samples, steps, guidance_scale, seed

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        x = sample_images(ema_module(trainer, pl_module), self.num_samples, self.steps,
                          guidance_scale=self.guidance_scale, seed=self.seed)
        stats, baseline = digits_fd_baseline(self.num_samples)
        fd = fid_against(digits_fd_metric(), stats, to_uint8(x))
        result = {"fd8x8": fd, "real_vs_real_fd8x8": baseline, "num_samples": self.num_samples, "steps": self.steps,
                  "guidance_scale": self.guidance_scale, "global_step": trainer.global_step}
        print(f"digits FD-8x8 of {self.num_samples} EMA samples: {fd:.3f} "
              f"(real-vs-real with {self.num_samples} real digits: {baseline:.3f})")
        out = Path(trainer.log_dir or trainer.default_root_dir) / "digits_fd.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        if trainer.logger is not None:
            trainer.logger.log_metrics({"fd8x8": fd, "fd8x8_real_baseline": baseline}, step=trainer.global_step)
