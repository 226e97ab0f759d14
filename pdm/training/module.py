"""The LightningModule that trains a PDM (or one of its experts)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from pdm.checkpoints import load_checkpoint, load_net_state, network_model_fn
from pdm.checkpoints.models import expert_range
from pdm.checkpoints.reading import CHECKPOINT_FORMAT
from pdm.nn import UNet
from pdm.nn.runtime import network_width, preferred_memory_format
from pdm.objectives import WEIGHTINGS, Target, check_target, weighted_x0_loss
from pdm.schedule import ScheduleName, build_schedule

NUM_LOSS_BUCKETS = 4
Weighting = Literal["sqrt_snr", "snr", "snr_plus_one", "truncated_snr", "min_snr", "p2", "constant"]


class PDMModule(L.LightningModule):
    """Denoising training of a patched U-Net.

    Each step draws discrete steps n uniformly over ``time_range`` (the whole schedule, or an
    expert's share), noises x0 to x_t with t = (n + 1) / N, predicts ``target`` and minimises
    w(SNR) * |x0_pred - x0|^2 (PDM: sqrt-SNR on x0). The network's config is stored in the
    checkpoint as plain values (``hparams.net``), so checkpoints load with ``weights_only=True``.

    Args:
        net: the :class:`pdm.nn.UNet` (a config's ``model.net`` with class_path / init_args).
        schedule, beta_start, beta_end, num_timesteps: the VP schedule.
        target: what the network predicts, ``x0`` (PDM), ``eps`` or ``v``.
        weighting: loss weight of the x0 error (see :func:`pdm.objectives.loss_weight`).
        min_snr_gamma: gamma of the ``min_snr`` weighting.
        time_range: inclusive range of discrete steps this model owns, e.g. (396, 999) for the
            high-noise expert; None for all.
        expert: ``high_noise`` or ``low_noise``: this model is one expert of a pair split at
            ``split_log_snr`` (its time_range follows: the high-noise expert owns every step whose
            log SNR lies below the split, the low-noise one the rest). The two experts may have
            different patch sizes: a coarse grid where the best prediction is blurry anyway.
        split_log_snr: the pair's split as a log SNR (ln(alpha²/sigma²)); PDM's ImageNet split,
            SNR 0.25, is ln 0.25 = -1.386. Keep it in one overlay file that both experts' commands
            layer (``--config configs/experts/digits_split.yaml``).
        label_dropout: probability of replacing a label by the null label (for CFG).
        optimizer: ``adam`` or ``adamw``; lr, betas, weight_decay as in torch.
        warmup_steps: linear learning-rate warm-up; constant afterwards (PDM uses no decay).
        lr_decay: ``none`` (PDM) or ``cosine``: after the warm-up, decay to 0 at the trainer's
            max_steps (short runs such as the digits default end sharper).
        fused_optimizer: use torch's fused Adam kernel (same update, one kernel for all tensors).
        compile_network: compile the network with ``torch.compile`` when training starts (in
            place, so checkpoint keys are unchanged; the EMA copy stays eager). On an H100 it
            gave 1.8-2.0x the training images/s of the LSUN and ImageNet-256 P = 4 configs and
            half the peak memory, after 1.5-2 minutes of compilation (benchmarks/RESULTS.md).
        init_from: a checkpoint whose EMA weights initialise this network (the low-noise
            expert starts from the high-noise expert).
        nonfinite: what a non-finite loss does: ``stop`` the run (default) or ``skip`` the step
            (no backward, no optimiser or EMA update; the trainer's step count advances; counted
            in ``train/nonfinite_skips``).
        max_nonfinite_skips: with ``skip``, stop after this many consecutive skipped steps (as
            fp16 loss scaling gives up on a run that never recovers).

    The noise, time steps and label dropout of step k come from a generator seeded by (the
    run's noise seed, k, rank); the noise seed is stored in the checkpoint, so a resumed run
    draws exactly what an uninterrupted one would.
    """

    def __init__(
        self,
        net: UNet,
        schedule: ScheduleName = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_timesteps: int = 1000,
        target: Target = "x0",
        weighting: Weighting = "sqrt_snr",
        min_snr_gamma: float = 5.0,
        time_range: tuple[int, int] | None = None,
        expert: Literal["high_noise", "low_noise"] | None = None,
        split_log_snr: float | None = None,
        label_dropout: float = 0.1,
        optimizer: Literal["adam", "adamw"] = "adam",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        warmup_steps: int = 5000,
        lr_decay: Literal["none", "cosine"] = "none",
        fused_optimizer: bool = False,
        compile_network: bool = False,
        init_from: str | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        max_nonfinite_skips: int = 10,
    ) -> None:
        super().__init__()
        _check_arguments(target, weighting, optimizer, label_dropout, lr, warmup_steps)
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        if max_nonfinite_skips < 1:
            raise ValueError(f"max_nonfinite_skips must be at least 1, got {max_nonfinite_skips}")
        time_range = expert_range(
            expert, split_log_snr, time_range, schedule, beta_start, beta_end, num_timesteps
        )
        lo, hi = (
            (0, num_timesteps - 1)
            if time_range is None
            else (int(time_range[0]), int(time_range[1]))
        )
        if not 0 <= lo <= hi <= num_timesteps - 1:
            raise ValueError(
                f"time_range {time_range} must satisfy 0 <= start <= end <= {num_timesteps - 1}"
            )
        self.save_hyperparameters(ignore=["net", "init_from"])
        self.hparams["net"] = {"class_path": "pdm.nn.UNet", "init_args": dict(net.config)}
        self.time_range = (lo, hi)
        self.schedule = build_schedule(schedule, beta_start, beta_end, num_timesteps)
        self.net = net
        # one image through forward(): Lightning's model summary counts the FLOPs of a forward pass
        # with it (it printed "Total Flops 0" without); it runs once, eagerly, before training
        c, size = net.config["in_channels"], net.config["image_size"]
        label = (torch.zeros(1, dtype=torch.long),) if net.config.get("num_classes") else ()
        self.example_input_array = (torch.zeros(1, c, size, size), torch.zeros(1), *label)
        # (1 - beta) products as a buffer so they follow the module's device
        self.register_buffer(
            "alphas_cumprod", self.schedule.alphas_cumprod.float(), persistent=False
        )
        self._last_batch_time: float | None = None
        self.noise_seed: int | None = (
            None  # set when training starts, or restored from a checkpoint
        )
        self.nonfinite_skips = 0  # consecutive skipped steps
        self._skip_step = False
        if init_from is not None:
            load_net_state(self.net, load_checkpoint(init_from)["state_dict"], init_from)

    # network -----------------------------------------------------------------------------
    def forward(self, x: Tensor, t_label: Tensor, y: Tensor | None = None) -> Tensor:
        """The raw network output (of kind ``target``) at discrete labels ``t_label``."""
        return self.net(x, t_label, y)

    def model_fn(self) -> Callable[..., Tensor]:
        """A ``model_fn(x, t, y=None)`` in continuous time for :func:`pdm.sampling.sample`."""
        return network_model_fn(self.net, self.schedule)

    # training --------------------------------------------------------------------------------
    def compile_net(self) -> None:
        """Compile the network in place with ``torch.compile`` (idempotent; state-dict keys unchanged)."""
        if getattr(self.net, "_compiled_call_impl", None) is None:
            self.net.compile()

    def on_fit_start(self) -> None:
        """Check the data against the network before the first step (a mismatch would train garbage),
        then compile the network if ``compile_network`` is set. This runs after the EMA callback
        has copied the module, so the EMA copy stays eager; ``configure_model`` is not used because
        Lightning's WeightAveraging warns about any module that overrides it."""
        check_data_fits_network(getattr(self.trainer, "datamodule", None), self.net)
        # the layout that is fastest where the network runs (channels-last on CUDA; on a CPU it
        # depends on the network's width); in place, so the optimiser keeps its parameters
        self.net.to(memory_format=preferred_memory_format(self.device, network_width(self.net)))
        if self.hparams.get("compile_network"):
            self.compile_net()

    def noised_batch(self, x0: Tensor, generator: torch.Generator | None = None):
        """Draw n, eps and x_t for a batch; returns (x_t, labels, eps, alpha, sigma)."""
        lo, hi = self.time_range
        n = torch.randint(lo, hi + 1, (x0.shape[0],), device=x0.device, generator=generator)
        abar = self.alphas_cumprod[n]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
        return x_t, n, eps, alpha, sigma

    def drop_labels(
        self, y: Tensor | None, generator: torch.Generator | None = None
    ) -> Tensor | None:
        """Replace a ``label_dropout`` fraction of labels by the null label (index num_classes)."""
        if y is None or self.net.num_classes is None:
            return None
        drop = (
            torch.rand(y.shape, device=y.device, generator=generator) < self.hparams.label_dropout
        )
        return torch.where(drop, torch.full_like(y, self.net.num_classes), y)

    def loss_per_sample(
        self, x0: Tensor, y: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(per-sample weighted losses, their discrete steps) for a clean batch."""
        x_t, n, eps, alpha, sigma = self.noised_batch(x0, generator)
        pred = self.net(x_t, n.float(), y)
        loss = weighted_x0_loss(
            pred.float(),
            x0.float(),
            eps.float(),
            alpha,
            sigma,
            target=self.hparams.target,
            weighting=self.hparams.weighting,
            gamma=self.hparams.min_snr_gamma,
        )
        return loss, n

    def _split(self, batch) -> tuple[Tensor, Tensor | None]:
        x0, y = (
            (batch[0], batch[1] if len(batch) > 1 else None)
            if isinstance(batch, (list, tuple))
            else (batch, None)
        )
        if x0.shape[-2:] != (self.net.image_size, self.net.image_size):
            raise ValueError(
                f"a batch of {tuple(x0.shape[-2:])} images reached a network built for "
                f"{self.net.image_size}x{self.net.image_size}; make data.image_size and the network's agree"
            )
        return x0, (y if self.net.num_classes is not None else None)

    def step_generator(self, device: torch.device) -> torch.Generator:
        """The random source of this optimiser step: (noise seed, step, rank) decide it."""
        if self.noise_seed is None:
            self.noise_seed = (
                torch.initial_seed() % 2**62
            )  # the run's seed (seed_everything), kept in checkpoints
        seed = (self.noise_seed * 1_000_003 + self.global_step * 65_537 + self.global_rank) % 2**63
        return torch.Generator(device=device).manual_seed(seed)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["pdm_format"] = CHECKPOINT_FORMAT  # a newer pdm's files are refused by name
        checkpoint["pdm_noise_seed"] = self.noise_seed
        # the step count the learning-rate schedule decays over (train.py refuses to stretch it)
        checkpoint["pdm_max_steps"] = self.trainer.max_steps if self._trainer is not None else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.noise_seed = checkpoint.get("pdm_noise_seed", self.noise_seed)

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        x0, y = self._split(batch)
        g = self.step_generator(x0.device)
        losses, n = self.loss_per_sample(x0, self.drop_labels(y, g), generator=g)
        self._skip_step = not self._finite(losses, batch_idx)
        if self._skip_step:
            return None  # no backward; optimizer_step below then leaves the weights, Adam and the EMA alone
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True)
        if (
            self._is_logging_step()
        ):  # per-step values are only recorded on logging steps; skip the syncs otherwise
            self._log_loss_buckets(losses, n)
            now = time.perf_counter()
            if self._last_batch_time is not None:
                self.log(
                    "train/images_per_second", x0.shape[0] / max(now - self._last_batch_time, 1e-9)
                )
        self._last_batch_time = time.perf_counter()
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The usual step, except that a step skipped for a non-finite loss never reaches the
        optimiser: the weights and Adam's moments stay as they were, and :class:`EMA` does not
        average. The trainer still counts the step (so step k keeps batch k and its noise) and
        the learning-rate schedule advances by one batch."""
        if self.hparams.get("nonfinite", "stop") != "skip":
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._skip_step = False
        optimizer_closure()  # training_step and backward
        if not self._skip_step:
            optimizer.step()  # clipping and the update, on the gradients just computed

    def _finite(self, losses: Tensor, batch_idx: int) -> bool:
        """Whether this step's losses are finite; with ``nonfinite: stop`` a non-finite loss raises
        (on its rank, which ends the run), with ``skip`` all ranks agree and skip together."""
        finite = bool(torch.isfinite(losses).all())
        skip_mode = self.hparams.get("nonfinite", "stop") == "skip"
        trainer = self._trainer
        if skip_mode and trainer is not None and trainer.world_size > 1:  # ranks must skip together
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.nonfinite_skips = 0
            return True
        where = f"global step {self.global_step}, batch {batch_idx}"
        if not skip_mode:
            raise FloatingPointError(
                f"non-finite loss at {where}; lower the learning rate, use bf16-mixed rather than 16-mixed precision, "
                "or set model.nonfinite: skip. The last checkpoint on disk is intact."
            )
        self.nonfinite_skips += 1
        self.log("train/nonfinite_skips", float(self.nonfinite_skips))
        limit = self.hparams.get("max_nonfinite_skips", 10)
        if self.nonfinite_skips >= limit:
            raise FloatingPointError(
                f"{self.nonfinite_skips} consecutive non-finite losses (the last at {where}); "
                "the run does not recover: lower the learning rate. The last checkpoint is intact."
            )
        return False

    def _log_loss_buckets(self, losses: Tensor, n: Tensor) -> None:
        buckets = (n * NUM_LOSS_BUCKETS // self.hparams.num_timesteps).clamp(
            max=NUM_LOSS_BUCKETS - 1
        )
        for b in range(NUM_LOSS_BUCKETS):
            sel = buckets == b
            if sel.any():
                self.log(f"train/loss_t{b}", losses[sel].mean())

    def _is_logging_step(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return True
        return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0

    def validation_step(self, batch, batch_idx: int) -> None:
        x0, y = self._split(batch)
        g = torch.Generator(device=x0.device).manual_seed(
            1000 + batch_idx
        )  # same noise every validation
        loss, _ = self.loss_per_sample(x0, y, generator=g)
        self.log("val/loss", loss.mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        cls = torch.optim.AdamW if self.hparams.optimizer == "adamw" else torch.optim.Adam
        extra = {"fused": True} if self.hparams.get("fused_optimizer") else {}
        opt = cls(
            self.net.parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
            **extra,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        total = getattr(self._trainer, "max_steps", -1) if self._trainer is not None else -1
        return lr_factor(
            step, self.hparams.warmup_steps, self.hparams.get("lr_decay", "none"), total
        )


def lr_factor(step: int, warmup_steps: int, lr_decay: str, max_steps: int | None) -> float:
    """The learning rate's factor at ``step``: linear warm-up, then constant (PDM, ``lr_decay``
    "none") or a cosine decay to 0 at ``max_steps``."""
    warmup = max(1, warmup_steps)
    if step < warmup or lr_decay == "none":
        return min(1.0, (step + 1) / warmup)
    if max_steps is None or max_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (max_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def check_data_fits_network(data, net) -> None:
    """The data's image size, channels and classes must be the network's (a mismatch would train
    garbage): a ValueError naming the setting to change. train.py calls it before the trainer
    exists; ``on_fit_start`` again, for modules built in code."""
    if data is None or net is None:
        return
    for key, net_key in (("image_size", "image_size"), ("channels", "in_channels")):
        have, want = getattr(data, key, None), getattr(net, net_key, None)
        if have is not None and want is not None and have != want:
            raise ValueError(
                f"the data has {key}={have} but the network was built for {net_key}={want}; "
                f"set model.net.init_args.{net_key}: {have} (or data.init_args.{key}: {want})"
            )
    classes, net_classes = getattr(data, "num_classes", None), getattr(net, "num_classes", None)
    if classes is not None and net_classes is not None and classes != net_classes:
        raise ValueError(
            f"the data has {classes} classes but the network {net_classes}; "
            f"set model.net.init_args.num_classes: {classes}"
        )


def _check_arguments(
    target: str, weighting: str, optimizer: str, label_dropout: float, lr: float, warmup_steps: int
) -> None:
    """A ValueError naming the fix for a bad training setting, before anything is built."""
    check_target(target)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if optimizer not in ("adam", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose adam or adamw")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
    if not (lr > 0 and lr < float("inf")):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
