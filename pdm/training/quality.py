"""Quality during training: every N steps, score K samples of the EMA weights and keep the best.

:class:`QualityMonitor` samples ``num_samples`` images with a few-step sampler on fixed seeds,
scores them with a Fréchet distance through torchmetrics against stored reference statistics
(``python -m pdm.metrics ref-stats``; Inception-v3 features, or the digits' 8x8 grey levels with
``feature: digits``, which need no file), and logs the score with the step, the images seen, the
training FLOPs so far (one step counted by ``torch.utils.flop_counter`` on the first batch) and
the training wall time. Each check is appended to ``<default_root_dir>/quality.jsonl``; the checkpoint with the
best score is kept as ``checkpoints/best.ckpt`` beside ``last.ckpt``.

Its cost is bounded: a check is skipped while the time spent checking exceeds ``max_cost``
(a fraction, default 0.1) of the training time so far, and the run ends with one line giving the
fraction it took. Without reference statistics (and not on digits) it does nothing, and says so.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

from pdm.images import to_uint8
from pdm.sampling import Settings
from pdm.training.callbacks import ema_module, sample_images


class QualityMonitor(L.Callback):
    """Score samples of the EMA weights during training (see the module docstring).

    Args:
        every_n_steps: a check every this many optimiser steps (and at the end).
        num_samples: images per check (more: a less noisy score, a costlier check).
        reference: reference statistics (.npz of ``python -m pdm.metrics ref-stats``, made with
            the same ``--feature``); not needed with ``feature: digits`` on the embedded digits.
        feature: ``inception`` (FID) or ``digits`` (FD on 8x8 grey levels: a cheap stand-in on
            any data given its ``reference``, the embedded digits' statistics without one).
        inception_weights: the Inception-v3 weights file (default: torch hub's cache).
        steps, solver, order, grid: the sampler of the checks (default: iPNDM-3 on time_quadratic,
            10 steps, the best plain setting at 8-10 NFE).
        guidance_scale: classifier-free guidance of the checks.
        seed: the checks' noise (the same images every time).
        max_cost: the largest fraction of training time the checks may take.
        save_best: keep ``best.ckpt`` by the score.
        max_train_seconds: stop the run after this much training time (the checks not counted;
            kept across a resume): the budget of an equal-time comparison.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        reference: str | None = None,
        feature: str = "inception",
        inception_weights: str | None = None,
        steps: int = 10,
        solver: str = "ipndm",
        order: int | None = 3,
        grid: str = "time_quadratic",
        guidance_scale: float = 1.0,
        seed: int = 12345,
        max_cost: float = 0.1,
        save_best: bool = True,
        max_train_seconds: float | None = None,
    ) -> None:
        if feature not in ("inception", "digits"):
            raise ValueError(f"QualityMonitor feature must be inception or digits, got {feature!r}")
        if every_n_steps < 1 or num_samples < 2:
            raise ValueError("QualityMonitor needs every_n_steps >= 1 and num_samples >= 2")
        self.every_n_steps, self.num_samples, self.reference = every_n_steps, num_samples, reference
        self.feature, self.inception_weights, self.guidance_scale = (
            feature,
            inception_weights,
            guidance_scale,
        )
        self.settings = Settings(steps=steps, solver=solver, order=order, grid=grid).resolved()
        self.seed, self.max_cost, self.save_best = seed, max_cost, save_best
        self.max_train_seconds = max_train_seconds
        self.enabled = feature == "digits" or reference is not None
        self._expert = False  # an expert alone: switched off in setup, saying why
        self.best: float | None = None
        self.train_seconds = self.check_seconds = 0.0
        self.flops_per_step: int | None = None
        self._metric = self._stats = None
        self._tick: float | None = None
        self._checked_step: int | None = None

    # -- state that a resume restores ---------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "train_seconds": self.train_seconds,
            "check_seconds": self.check_seconds,
            "flops_per_step": self.flops_per_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.check_seconds = float(state.get("check_seconds", 0.0))
        self.flops_per_step = state.get("flops_per_step")

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse, before the first step, what would fail at the first check."""
        lo, hi = getattr(pl_module, "time_range", (0, 0))
        if self.enabled and (lo > 0 or hi < pl_module.schedule.num_timesteps - 1):
            self.enabled, self._expert = False, True  # an expert alone makes no finished image
            if trainer.is_global_zero:
                print(
                    f"QualityMonitor: this model is an expert (steps {lo}..{hi}); it makes no "
                    "finished image alone, so quality is not scored during this run (score the "
                    "pair: python -m pdm.ablation.split --pair)",
                    file=sys.stderr,
                )
            return
        if not self.enabled:
            return
        from pdm.metrics import FeatureStats, inception_weights_path

        if self.feature == "inception":
            inception_weights_path(self.inception_weights)  # a ValueError naming the download
        if self.reference is not None:
            dims = FeatureStats.load(self.reference).mu.shape[0]
            needed = 64 if self.feature == "digits" else 2048
            if dims != needed:
                raise ValueError(
                    f"QualityMonitor reference {self.reference} holds {dims}-dimensional features, "
                    f"feature {self.feature} makes {needed}; compute it with `python -m pdm.metrics "
                    f"ref-stats --feature {self.feature}`"
                )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled and trainer.is_global_zero and not self._expert:
            print(
                "QualityMonitor: no reference statistics given (reference: FILE from `python -m pdm.metrics "
                "ref-stats`); quality is not scored during this run",
                file=sys.stderr,
            )
        self._tick = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self.train_seconds += now - (self._tick or now)
        if self.enabled and self.flops_per_step is None:  # counted once: only checks log it
            self.flops_per_step = _step_flops(pl_module, batch) * max(trainer.world_size, 1)
        step = trainer.global_step
        last = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if self.max_train_seconds is not None:
            spent = trainer.strategy.broadcast(
                self.train_seconds, src=0
            )  # every rank stops together
            if spent >= self.max_train_seconds:
                trainer.should_stop = True
                last = step
        if self.enabled and step % self.every_n_steps == 0 and step != last:
            if self.check_seconds <= self.max_cost * self.train_seconds:
                self.check(trainer, pl_module)
        self._tick = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        if self._checked_step != trainer.global_step:  # the last step may have had its check
            self.check(trainer, pl_module)
        if trainer.is_global_zero and self.train_seconds > 0:
            share = self.check_seconds / self.train_seconds
            print(
                f"QualityMonitor: checks took {self.check_seconds:.1f} s, {share:.1%} of the training time "
                f"({self.train_seconds:.1f} s); best {self._name()} {self.best:.4g}",
                file=sys.stderr,
            )

    # -- one check ------------------------------------------------------------------------------
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        """Sample, score, log, append to quality.jsonl and keep best.ckpt; returns the score."""
        t0 = time.perf_counter()
        score = None
        if trainer.is_global_zero:
            x, _ = sample_images(
                ema_module(trainer, pl_module),
                self.num_samples,
                self.settings,
                self.guidance_scale,
                self.seed,
            )
            score = self._score(to_uint8(x))
        score = trainer.strategy.broadcast(score, src=0)
        self.check_seconds += time.perf_counter() - t0
        step = self._checked_step = trainer.global_step
        record = {
            "step": step,
            "images_seen": step * _batch_size(trainer) * max(trainer.world_size, 1),
            "train_flops": (self.flops_per_step or 0) * step,
            "train_seconds": round(self.train_seconds, 3),
            "check_seconds": round(self.check_seconds, 3),
            self._name(): score,
        }
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"quality/{self._name()}": score}, step=step)
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            with open(root / "quality.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.save_best and (self.best is None or score < self.best):
            self.best = score
            folder = _checkpoint_folder(trainer)
            if folder is not None:
                trainer.save_checkpoint(os.path.join(folder, "best.ckpt"))
        return score

    def _name(self) -> str:
        return "fd8x8" if self.feature == "digits" else "fid"

    def _score(self, images) -> float:
        from pdm.metrics import FeatureStats, digits_fd_metric, fid_against, make_fid

        if self._metric is None:
            if self.feature == "digits":
                self._metric = digits_fd_metric()
            else:
                self._metric = make_fid(inception_weights=self.inception_weights)
            if self.reference is not None:
                self._stats = FeatureStats.load(self.reference)
            else:
                from pdm.metrics import compute_stats, digits_reference_images

                self._stats = compute_stats(self._metric, digits_reference_images().numpy())
        return fid_against(
            self._metric, self._stats, images.numpy() if hasattr(images, "numpy") else images
        )


def _batch_size(trainer: L.Trainer) -> int:
    data = trainer.datamodule
    return int(
        getattr(data, "batch_size", 0)
        or getattr(getattr(data, "hparams", {}), "batch_size", 0)
        or 0
    )


def _checkpoint_folder(trainer: L.Trainer) -> str | None:
    """Where the run's checkpoints go (its RunCheckpoint's folder)."""
    from pdm.training.callbacks import RunCheckpoint

    for cb in trainer.callbacks:
        if isinstance(cb, RunCheckpoint):
            return cb.folder(trainer)
    return None


def _step_flops(pl_module: L.LightningModule, batch) -> int:
    """Training FLOPs of one step on this rank (forward and backward of the network, counted)."""
    from pdm.metrics.cost import count_flops

    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
    net = pl_module.net
    t = torch.zeros(x.shape[0], device=x.device)
    y = y if getattr(net, "num_classes", None) is not None else None
    was_training = net.training
    flops = count_flops(net, x.detach(), t, y, train=True)
    net.train(was_training)
    return flops
