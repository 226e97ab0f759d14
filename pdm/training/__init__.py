"""Training: the LightningModule, EMA and callbacks."""

from pdm.training.callbacks import DigitsFD, RunCheckpoint, SampleGrid, ema_module, sample_images
from pdm.training.ema import EMA, ema_decay
from pdm.training.module import PDMModule
from pdm.training.preemption import Preemption
from pdm.training.quality import QualityMonitor

__all__ = [
    "DigitsFD",
    "EMA",
    "PDMModule",
    "Preemption",
    "QualityMonitor",
    "RunCheckpoint",
    "SampleGrid",
    "ema_decay",
    "ema_module",
    "sample_images",
]
