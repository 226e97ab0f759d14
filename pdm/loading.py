"""Rebuilding trained models from checkpoints for sampling (EMA weights, config from the file)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdm.checkpoints import load_checkpoint, load_net_state
from pdm.sampling import classifier_free_guidance, expert_router
from pdm.training.module import PDMModule


@dataclass
class LoadedModel:
    """A model function ready for :func:`pdm.sampling.sample`, with what the sampler must know."""

    model_fn: object
    schedule: object
    prediction: str
    in_channels: int
    image_size: int
    num_classes: int | None
    config: dict


def load_module(path: str, device: str | torch.device = "cpu") -> PDMModule:
    """A PDMModule with the checkpoint's EMA weights (Lightning's WeightAveraging stores them as state_dict)."""
    ckpt = load_checkpoint(path)
    hp = dict(ckpt.get("hyper_parameters") or {})
    if not hp:
        raise ValueError(f"{path!r} has no hyper_parameters; it was not written by pdm's train.py")
    hp = PDMModule.config_from(hp)
    try:
        module = PDMModule(**hp)
    except TypeError as e:
        raise ValueError(f"{path!r} was written for another architecture or version: {e}") from None
    # Lightning's WeightAveraging stores the EMA weights as state_dict; exports hold only those
    load_net_state(module.net, ckpt["state_dict"], path)
    return module.to(device).eval()


def load_for_sampling(paths: list[str], guidance_scale: float = 1.0, device: str | torch.device = "cpu") -> LoadedModel:
    """One checkpoint, or two expert checkpoints (high- and low-noise, in any order)."""
    if not 1 <= len(paths) <= 2:
        raise ValueError("pass one --ckpt, or two for a high-noise / low-noise expert pair")
    modules = [load_module(p, device) for p in paths]
    first = modules[0]
    hp = first.hparams
    if len(modules) == 2:
        for key in ("in_channels", "image_size", "num_classes", "target", "num_timesteps", "schedule"):
            if modules[0].hparams[key] != modules[1].hparams[key]:
                raise ValueError(f"the two experts disagree on {key}; pass checkpoints of one expert pair")
        high, low = sorted(modules, key=lambda m: -m.time_range[1])
        if low.time_range[1] + 1 != high.time_range[0] or low.time_range[0] != 0 or high.time_range[1] != hp.num_timesteps - 1:
            raise ValueError(f"expert time ranges {low.time_range} and {high.time_range} do not meet: the low-noise "
                             f"expert must own 0..k-1 and the high-noise one k..{hp.num_timesteps - 1}")
        fn = expert_router(high.model_fn(), low.model_fn(), first.schedule, split_label=high.time_range[0])
    else:
        if first.time_range != (0, hp.num_timesteps - 1):
            raise ValueError(f"{paths[0]!r} is an expert owning steps {first.time_range}; pass its partner "
                             "checkpoint as a second --ckpt")
        fn = first.model_fn()
    if guidance_scale != 1.0:
        if hp.num_classes is None:
            raise ValueError("guidance needs a class-conditional model; this one is unconditional "
                             "(drop --guidance-scale)")
        fn = classifier_free_guidance(fn, guidance_scale, hp.num_classes)
    return LoadedModel(fn, first.schedule, hp.target, hp.in_channels, hp.image_size, hp.num_classes, dict(hp))
