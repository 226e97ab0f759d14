"""Trained networks rebuilt for sampling: a checkpoint (or a high/low-noise expert pair) becomes
a ``model_fn(x, t, y)`` in continuous time for :func:`pdm.sampling.sample`, on a device, in a
precision, compiled or not, with classifier-free guidance when asked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    time_range = tuple(hp.get("time_range") or (0, n - 1))
    config = {"net": net_cfg, **{k: hp.get(k) for k in SAMPLING_KEYS}}
    return Model(
        place(net, device, dtype).eval(),
        schedule,
        hp.get("target", "x0"),
        (int(time_range[0]), int(time_range[1])),
        config,
    )


@dataclass
class LoadedModel:
    """A model function ready for :func:`pdm.sampling.sample`, with what the sampler must know."""

    model_fn: Callable[..., Tensor]
    schedule: VPSchedule
    prediction: str
    in_channels: int
    image_size: int
    num_classes: int | None
    config: dict[str, Any]


def load_for_sampling(
    paths: list[str],
    guidance_scale: float = 1.0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile_mode: str | None = None,
    batch_size: int | None = None,
    fixed_batch: bool = False,
) -> LoadedModel:
    """One checkpoint, or two expert checkpoints (high- and low-noise, in any order).

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
        high, low = _expert_pair(models)
        fn = expert_router(
            model_fn(high.net, high.schedule),
            model_fn(low.net, low.schedule),
            first.schedule,
            split_label=high.time_range[0],
        )
    else:
        if first.time_range != (0, n - 1):
            raise ValueError(
                f"{paths[0]!r} is an expert owning steps {first.time_range}; pass its partner "
                "checkpoint as a second --ckpt"
            )
        fn = model_fn(first.net, first.schedule)
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
    )


def _expert_pair(models: list[Model]) -> tuple[Model, Model]:
    """(high-noise, low-noise) experts, checked to share data, schedule and target and to meet."""
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
    high, low = sorted(models, key=lambda m: -m.time_range[1])
    n = a.schedule.num_timesteps
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
