"""Training: the LightningModule, EMA and callbacks."""

from pdm.training.callbacks import SampleGrid
from pdm.training.ema import EMA, ema_decay
from pdm.training.module import PDMModule, build_schedule

__all__ = ["EMA", "PDMModule", "SampleGrid", "build_schedule", "ema_decay"]
