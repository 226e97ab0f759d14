"""Trained networks rebuilt for sampling: a checkpoint (or a high/low-noise expert pair) becomes
a ``model_fn(x, t, y)`` in continuous time for :func:`pdm.sampling.sample`, on a device, in a
precision, compiled or not, with classifier-free guidance when asked."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from pdm.checkpoints.reading import SAMPLING_KEYS, load_checkpoint, load_net_state
from pdm.nn import UNet
from pdm.nn.runtime import FixedBatch, autocast, compile_network, place, precision_dtype
from pdm.sampling import classifier_free_guidance, expert_router
from pdm.schedule import VPSchedule, build_schedule


def network_model_fn(
    net: UNet,
    schedule: VPSchedule,
    compile_mode: str | None = None,
    batch: int | None = None,
    fixed_batch: bool = False,
) -> Callable[..., Tensor]:
    """``model_fn(x, t, y=None)`` in continuous time: the network sees the label N (t - 1/N).

    The network computes in its parameters' dtype (under autocast when that is bf16 or fp16, so
    reductions stay accurate) and its output comes back in x's dtype: a sampler's state and
    updates keep their own precision. ``compile_mode`` runs a ``torch.compile``d network on
    fixed batches of ``batch`` rows (:func:`pdm.nn.runtime.compile_network`); ``fixed_batch`` pads
    an eager network's calls to ``batch`` rows too, so that a row's output never depends on how
    many rows share its call (CPU kernels round differently at other batch sizes): what per-image
    step control needs, whose calls hold however many images are still going.
    """
    dtype = next(net.parameters()).dtype
    if (compile_mode is not None or fixed_batch) and batch is None:
        raise ValueError("a compiled or fixed-batch network needs its batch size")
    run = net if compile_mode is None else compile_network(net, batch, compile_mode)
    if compile_mode is None and fixed_batch:
        run = FixedBatch(net, batch)

    def fn(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        label = schedule.label(t.double()).to(x.device, torch.float32)
        with autocast(x.device, dtype):
            out = run(x.to(dtype), label, y)
        return out.to(x.dtype)

    return fn


@dataclass
class Model:
    """One trained network rebuilt from a checkpoint, with what sampling needs to know."""

    net: UNet
    schedule: VPSchedule
    target: str
    time_range: tuple[int, int]
    config: dict[str, Any]


def load_model(path: str, device: str | torch.device = "cpu", precision: str = "fp32") -> Model:
    """The EMA network of a checkpoint or export, in eval mode, with its schedule and target, on
    ``device`` in its preferred memory layout, its weights in ``precision``."""
    dtype = precision_dtype(precision, device)
    ckpt = load_checkpoint(path)
    hp = dict(ckpt.get("hyper_parameters") or {})
    net_cfg = (hp.get("net") or {}).get("init_args") if isinstance(hp.get("net"), dict) else None
    if not isinstance(net_cfg, dict):
        raise ValueError(
            f"{path!r} holds no network config (hparams.net); it was not written by this version of "
            "pdm's train.py"
        )
    try:
        net = UNet(**net_cfg)
        schedule = build_schedule(
            hp.get("schedule", "linear"),
            hp.get("beta_start", 1e-4),
            hp.get("beta_end", 0.02),
            hp.get("num_timesteps", 1000),
        )
    except TypeError as e:
        raise ValueError(f"{path!r} was written for another architecture or version: {e}") from None
    load_net_state(net, ckpt["state_dict"], path)
    n = schedule.num_timesteps
    time_range = hp.get("time_range")
    if hp.get("expert") is not None:  # an expert of a pair split by log SNR: its steps follow
        time_range = expert_range(
            hp["expert"],
            hp.get("split_log_snr"),
            time_range,
            hp.get("schedule", "linear"),
            hp.get("beta_start", 1e-4),
            hp.get("beta_end", 0.02),
            n,
        )
    time_range = tuple(time_range or (0, n - 1))
    config = {"net": net_cfg, **{k: hp.get(k) for k in SAMPLING_KEYS}}
    return Model(
        place(net, device, dtype).eval(),
        schedule,
        hp.get("target", "x0"),
        (int(time_range[0]), int(time_range[1])),
        config,
    )


@dataclass
class Expert:
    """One network of a sampled model, with the images it was called on so far (a guided call
    counts its conditional and unconditional rows) and what one call on one image costs."""

    name: str  # "model", or "high_noise" / "low_noise" for an expert pair
    net: UNet
    time_range: tuple[int, int]
    flops_per_call: int | None = None  # one forward pass, one image (count_call_flops)
    images: int = 0

    @property
    def patch_size(self) -> int:
        return int(self.net.config.get("patch_size", 1))

    def record(self) -> dict:
        return {
            "patch_size": self.patch_size,
            "steps_owned": list(self.time_range),
            "image_calls": self.images,
            "gflops_per_image_call": None
            if self.flops_per_call is None
            else self.flops_per_call / 1e9,
        }


def _counted(fn: Callable[..., Tensor], expert: Expert) -> Callable[..., Tensor]:
    def counted(x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        expert.images += x.shape[0]
        return fn(x, t, *args, **kwargs)

    return counted


@dataclass
class LoadedModel:
    """A model function ready for :func:`pdm.sampling.sample`, with what the sampler must know
    and the networks it calls (``experts``, counting their calls)."""

    model_fn: Callable[..., Tensor]
    schedule: VPSchedule
    prediction: str
    in_channels: int
    image_size: int
    num_classes: int | None
    config: dict[str, Any]
    experts: list[Expert] = field(default_factory=list)

    def network_record(self, images: int) -> dict:
        """Network calls per expert and the sampling FLOPs per image over ``images`` images (the
        experts' ``flops_per_call`` counted first: :func:`pdm.metrics.cost.count_call_flops`)."""
        if any(e.flops_per_call is None for e in self.experts):
            raise ValueError("count the experts' FLOPs first (pdm.metrics.cost.count_call_flops)")
        flops = sum(e.images * e.flops_per_call for e in self.experts)
        return {
            "experts": {e.name: e.record() for e in self.experts},
            "sampling_gflops_per_image": flops / max(images, 1) / 1e9,
        }


def load_for_sampling(
    paths: list[str],
    guidance_scale: float = 1.0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile_mode: str | None = None,
    batch_size: int | None = None,
    fixed_batch: bool = False,
    split_log_snr: float | None = None,
) -> LoadedModel:
    """One checkpoint, or two expert checkpoints (high- and low-noise, in any order), which may
    have different patch sizes.

    ``split_log_snr`` routes a pair at that log SNR instead of where its experts meet: any split
    for two models trained on the whole schedule (a split search), and only one inside both
    experts' trained steps otherwise.

    ``precision`` is the networks' (``fp32``, ``bf16``, ``fp16``); ``compile_mode`` compiles
    them for batches of ``batch_size`` images (twice that under guidance, where the conditional
    and unconditional halves share one call); ``fixed_batch`` pads eager calls to that size
    (:func:`network_model_fn`).
    """
    if not 1 <= len(paths) <= 2:
        raise ValueError("pass one --ckpt, or two for a high-noise / low-noise expert pair")
    models = [load_model(p, device, precision) for p in paths]
    net_batch = None if batch_size is None else batch_size * (2 if guidance_scale != 1.0 else 1)
    model_fn = partial(
        network_model_fn, compile_mode=compile_mode, batch=net_batch, fixed_batch=fixed_batch
    )
    first = models[0]
    n = first.schedule.num_timesteps
    if len(models) == 2:
        high, low = _expert_pair(models, split_log_snr)
        split = (
            high.time_range[0]
            if split_log_snr is None
            else split_step(first.schedule, split_log_snr)
        )
        experts = [
            Expert("high_noise", high.net, high.time_range),
            Expert("low_noise", low.net, low.time_range),
        ]
        fn = expert_router(
            _counted(model_fn(high.net, high.schedule), experts[0]),
            _counted(model_fn(low.net, low.schedule), experts[1]),
            first.schedule,
            split_label=split,
        )
    else:
        if first.time_range != (0, n - 1):
            raise ValueError(
                f"{paths[0]!r} is an expert owning steps {first.time_range}; pass its partner "
                "checkpoint as a second --ckpt"
            )
        if split_log_snr is not None:
            raise ValueError(
                "a split (--split-log-snr) routes two checkpoints; pass a second --ckpt"
            )
        experts = [Expert("model", first.net, first.time_range)]
        fn = _counted(model_fn(first.net, first.schedule), experts[0])
    if guidance_scale != 1.0:
        if first.net.num_classes is None:
            raise ValueError(
                "guidance needs a class-conditional model; this one is unconditional (drop --guidance-scale)"
            )
        fn = classifier_free_guidance(fn, guidance_scale, first.net.num_classes)
    return LoadedModel(
        fn,
        first.schedule,
        first.target,
        first.net.in_channels,
        first.net.image_size,
        first.net.num_classes,
        first.config,
        experts,
    )


def expert_range(
    expert: str | None,
    split_log_snr: float | None,
    time_range,
    schedule: str,
    beta_start: float,
    beta_end: float,
    num_timesteps: int,
) -> tuple[int, int] | None:
    """The steps an expert of a pair split at ``split_log_snr`` owns (``time_range`` itself
    when no expert is named); a ValueError for a split outside the schedule or a contradiction."""
    if expert is None:
        if split_log_snr is not None:
            raise ValueError("model.split_log_snr needs model.expert (high_noise or low_noise)")
        return time_range
    if expert not in ("high_noise", "low_noise"):
        raise ValueError(f"model.expert must be high_noise or low_noise, got {expert!r}")
    if split_log_snr is None:
        raise ValueError(
            "model.expert needs the pair's split: set model.split_log_snr (one overlay for both "
            "experts, e.g. --config configs/experts/digits_split.yaml)"
        )
    k = split_step(build_schedule(schedule, beta_start, beta_end, num_timesteps), split_log_snr)
    derived = (k, num_timesteps - 1) if expert == "high_noise" else (0, k - 1)
    if time_range is not None and tuple(int(v) for v in time_range) != derived:
        raise ValueError(
            f"model.time_range {tuple(time_range)} contradicts the {expert} expert's steps "
            f"{derived} at split_log_snr {split_log_snr}; give one of them"
        )
    return derived


def split_step(schedule: VPSchedule, split_log_snr: float) -> int:
    """The first discrete step whose log SNR lies below ``split_log_snr`` (where the high-noise
    expert takes over); a ValueError where one side would get no step."""
    try:
        k = schedule.index_where_snr_below(math.exp(split_log_snr))
    except (ValueError, OverflowError):
        k = 0
    if k == 0:
        abar = schedule.alphas_cumprod
        log_snr = torch.log(abar / (1 - abar))
        raise ValueError(
            f"split log SNR {split_log_snr} leaves one expert no steps: choose a value between "
            f"{float(log_snr[-1]):.2f} and {float(log_snr[0]):.2f}"
        )
    return k


def _expert_pair(models: list[Model], split_log_snr: float | None = None) -> tuple[Model, Model]:
    """(high-noise, low-noise) experts, checked to share data, schedule and target and to meet
    (or, with ``split_log_snr``, to have both been trained on their side of that split)."""
    a, b = models
    checks = {
        "in_channels": (a.net.in_channels, b.net.in_channels),
        "image_size": (a.net.image_size, b.net.image_size),
        "num_classes": (a.net.num_classes, b.net.num_classes),
        "target": (a.target, b.target),
    }
    checks.update(
        {
            k: (a.config.get(k), b.config.get(k))
            for k in ("schedule", "beta_start", "beta_end", "num_timesteps")
        }
    )
    for key, (x, y) in checks.items():
        if x != y:
            raise ValueError(
                f"the two experts disagree on {key} ({x} vs {y}); pass checkpoints of one expert pair"
            )
    high, low = sorted(models, key=lambda m: (-m.time_range[1], -m.time_range[0]))
    n = a.schedule.num_timesteps
    if split_log_snr is not None:
        k = split_step(a.schedule, split_log_snr)
        if low.time_range[0] != 0 or high.time_range[1] != n - 1:
            raise ValueError("one of the two checkpoints owns neither end of the schedule")
        if not (high.time_range[0] <= k and low.time_range[1] >= k - 1):
            raise ValueError(
                f"a split at log SNR {split_log_snr} (step {k}) lies outside the experts' trained "
                f"steps (high-noise {high.time_range}, low-noise {low.time_range}); drop "
                "--split-log-snr to route where they meet"
            )
        return high, low
    if (
        low.time_range[1] + 1 != high.time_range[0]
        or low.time_range[0] != 0
        or high.time_range[1] != n - 1
    ):
        raise ValueError(
            f"expert time ranges {low.time_range} and {high.time_range} do not meet: the low-noise "
            f"expert must own 0..k-1 and the high-noise one k..{n - 1}"
        )
    return high, low
