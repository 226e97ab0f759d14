"""EMA of the weights on top of Lightning's ``WeightAveraging`` (checkpointing and resume come with it).

Lightning saves the averaged weights as the checkpoint's ``state_dict`` and the raw ones as
``current_model_state``, restores both on resume, and copies the average into the model
when training ends. This subclass adds the warm-up of the decay used by TensorFlow's
ExponentialMovingAverage and many diffusion codebases: decay_n = min(decay, (1 + n) / (10 + n)).
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor, nn

from pdm.nn.runtime import network_width, preferred_memory_format


def ema_decay(decay: float, num_updates: int | Tensor, warmup: bool = True) -> Tensor:
    """The decay used at update ``num_updates`` (0-based count of earlier updates)."""
    n = torch.as_tensor(num_updates, dtype=torch.float64)
    if not warmup:
        return torch.as_tensor(decay, dtype=torch.float64)
    return torch.clamp((1.0 + n) / (10.0 + n), max=decay)


class EMA(WeightAveraging):
    """Exponential moving average of the weights, updated after every optimiser step.

    Args:
        decay: the final decay (PDM: 0.9999 per step).
        warmup: ramp the decay as (1 + n) / (10 + n) so early averages are not dominated by init.
        update_every_n_steps: update the average every n optimiser steps.
    """

    def __init__(
        self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")

        def multi_avg_fn(
            averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor
        ) -> None:
            # one fused multi-tensor lerp per update instead of a Python loop over the parameters
            d = float(ema_decay(decay, int(num_averaged) - 1, warmup))
            torch._foreach_lerp_(averaged, current, 1.0 - d)

        super().__init__(multi_avg_fn=multi_avg_fn, use_buffers=True)
        self.decay = decay
        self.warmup = warmup
        self.update_every_n_steps = update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Update after every ``update_every_n_steps`` optimiser steps, never per epoch."""
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Average after each optimiser step, but not after a step the module skipped (a
        non-finite loss with ``nonfinite: skip``): the weights did not change, and the average
        must not move either."""
        if getattr(pl_module, "_skip_step", False):
            self._latest_update_step = trainer.global_step
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_fit_start(self, trainer, pl_module) -> None:
        """Give the averaged copy the memory layout the module trains in (so the lerp reads both
        alike); checkpoints store the same values either way."""
        if self._average_model is not None:
            net = getattr(pl_module, "net", pl_module)
            self._average_model.to(
                memory_format=preferred_memory_format(pl_module.device, network_width(net))
            )

    @property
    def ema_module(self) -> nn.Module | None:
        """The LightningModule copy holding the averaged weights (None before fit starts)."""
        return None if self._average_model is None else self._average_model.module
