"""Checkpoints: loading without executing code, atomic saving, safetensors export, and
rebuilding trained models (or expert pairs) for sampling.

A training checkpoint is Lightning's: ``state_dict`` holds the EMA weights (Lightning's
WeightAveraging writes them there), ``current_model_state`` the raw ones, and
``hyper_parameters`` the module's settings with the network config under ``net``. Exports
are safetensors files with the same settings as JSON metadata. Rebuilding needs only
:mod:`pdm.nn`, :mod:`pdm.schedule` and :mod:`pdm.sampling`, so training may use this module
without an import cycle.

    python -m pdm.checkpoints CKPT OUT.safetensors [--overwrite]   # export EMA weights
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor, nn

from pdm.atomic import atomic_write
from pdm.nn import UNet
from pdm.nn.runtime import autocast, compile_network, place, precision_dtype
from pdm.sampling import classifier_free_guidance, expert_router
from pdm.schedule import VPSchedule, build_schedule

EXPORT_FORMAT = "pdm-ema-v2"
SAMPLING_KEYS = ("schedule", "beta_start", "beta_end", "num_timesteps", "target", "time_range")
SAFETENSORS_HINT = "export weights with `python -m pdm.checkpoints CKPT OUT.safetensors`"


# --- reading --------------------------------------------------------------------------------------

def is_safetensors(path: str) -> bool:
    """Whether a file is a safetensors file (an 8-byte header length, then a JSON header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= os.path.getsize(path) - 8


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A pdm checkpoint (.ckpt written by train.py) or export (.safetensors), loaded without
    running code: ``torch.load(weights_only=True)`` refuses pickles that would. Anything else is
    a ValueError that says what the file is and what to pass instead."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder; pass the checkpoint file inside it (e.g. {path}/checkpoints/last.ckpt)")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist; pass the path of a .ckpt file written by train.py")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} is empty (0 bytes); pass a complete checkpoint")
    if is_safetensors(path):
        return load_safetensors(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "WeightsUnpickler error" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"{path!r} is not a plain-weights checkpoint: loading it would unpickle arbitrary objects "
                             "(run code), which is refused; use a checkpoint written by pdm's train.py") from None
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint (truncated or another format)") from None
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a checkpoint"
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint ({type(e).__name__}); it may be truncated") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path!r} is not a pdm checkpoint (no state_dict); pass a .ckpt written by train.py")
    return ckpt


def load_safetensors(path: str) -> dict[str, Any]:
    """Read an export back as {"state_dict", "hyper_parameters"} (plain tensors and JSON: no code can run)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from None
    if "pdm_config" not in metadata:
        raise ValueError(f"{path!r} has no pdm model config; {SAFETENSORS_HINT}")
    return {"state_dict": state, "hyper_parameters": json.loads(metadata["pdm_config"]), "format": "safetensors"}


def load_net_state(net: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load the ``net.*`` tensors of a checkpoint into ``net``; any mismatch is a ValueError naming the file."""
    state = {k[len("net."):]: v for k, v in state_dict.items() if k.startswith("net.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        shapes = str(e).count("size mismatch")
        raise ValueError(f"{source!r} holds a different architecture ({shapes} tensors of other shapes); use a "
                         "checkpoint of the same network config") from None
    if missing or unexpected:
        raise ValueError(f"{source!r} holds a different architecture (missing {len(missing)}, unexpected "
                         f"{len(unexpected)} tensors); use a checkpoint of the same network config")


def training_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint train.py can resume: a .ckpt with optimiser and loop state (not an export)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") == "safetensors" or "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ValueError(f"{path!r} holds weights only (an export), not a training state; resume from a .ckpt in "
                         "the run's checkpoints/ folder")
    return ckpt


# --- writing --------------------------------------------------------------------------------------

class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO through :func:`pdm.atomic.atomic_write`: a kill at any moment
    leaves either the previous checkpoint or the new one, never a truncated file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def export_safetensors(ckpt_path: str, out_path: str, overwrite: bool = False) -> str:
    """Write the checkpoint's EMA network weights to safetensors, with the model config as metadata.

    Refuses to write over its input, to a name without ``.safetensors`` (sample.py reads
    exports by that name) and over an existing file unless ``overwrite``.
    """
    from safetensors.torch import save_file

    if not out_path.endswith(".safetensors"):
        raise ValueError(f"export to a name ending in .safetensors, not {out_path!r}")
    if os.path.exists(out_path) and os.path.exists(ckpt_path) and os.path.samefile(ckpt_path, out_path):
        raise ValueError(f"{out_path!r} is the checkpoint being exported; choose another output name")
    if os.path.exists(out_path) and not overwrite:
        raise ValueError(f"{out_path!r} exists; choose another name or pass --overwrite")
    ckpt = load_checkpoint(ckpt_path)
    hp = dict(ckpt.get("hyper_parameters") or {})
    config = {k: hp[k] for k in ("net", *SAMPLING_KEYS) if k in hp}
    if "net" not in config:
        raise ValueError(f"{ckpt_path!r} holds no network config; export a checkpoint written by pdm's train.py")
    tensors = {k: v.contiguous() for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    metadata = {"pdm_config": json.dumps(config), "format": EXPORT_FORMAT, "global_step": str(ckpt.get("global_step", ""))}
    atomic_write(out_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return out_path


def export_official(official_path: str, config_path: str, out_path: str, overwrite: bool = False) -> str:
    """Convert an official PatchDiffusion-Pytorch state dict into an export ``sample.py`` reads.

    ``config_path`` is a pdm config (YAML) describing the same network (``model.net``) and
    diffusion (``model.schedule``, ``beta_*``, ``target``, ...). The official ``.pt`` is read
    with ``weights_only=True``; the converted weights must load into that network strictly.
    """
    import yaml
    from safetensors.torch import save_file

    from pdm.nn import convert_official_state_dict

    if not out_path.endswith(".safetensors"):
        raise ValueError(f"write the converted weights to a name ending in .safetensors, not {out_path!r}")
    if os.path.exists(out_path) and not overwrite:
        raise ValueError(f"{out_path!r} exists; choose another name or pass --overwrite")
    try:
        with open(config_path) as f:
            model_cfg = (yaml.safe_load(f) or {}).get("model") or {}
        net_cfg = dict(model_cfg["net"]["init_args"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path!r} is not a pdm config with model.net.init_args ({e}); pass e.g. "
                         "configs/lsun_church_p4.yaml") from None
    try:
        net = UNet(**net_cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the model.net of {config_path!r} is not a valid UNet: {e}") from None
    state = load_checkpoint_state(official_path)
    try:
        net.load_state_dict(convert_official_state_dict(state), strict=True)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{official_path!r} does not fit the network of {config_path!r}: "
                         f"{str(e).splitlines()[0]}; pass the config the model was trained with") from None
    config = {"net": {"class_path": "pdm.nn.UNet", "init_args": net_cfg},
              **{k: model_cfg[k] for k in SAMPLING_KEYS if k in model_cfg}}
    tensors = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
    metadata = {"pdm_config": json.dumps(config), "format": EXPORT_FORMAT, "converted_from": os.path.basename(official_path)}
    atomic_write(out_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return out_path


def load_checkpoint_state(path: str) -> dict[str, Tensor]:
    """A plain state dict from a ``.pt`` file, read without running code (``state_dict`` / ``model``
    wrappers are unwrapped)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path!r} asks to run code when loaded; it is refused (only plain tensors are read)") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path!r} is not a readable PyTorch file: {str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} holds no state dict of tensors")
    return obj


# --- rebuilding for sampling -------------------------------------------------------------------------

def network_model_fn(net: UNet, schedule: VPSchedule, compile_mode: str | None = None,
                     batch: int | None = None) -> Callable[..., Tensor]:
    """``model_fn(x, t, y=None)`` in continuous time: the network sees the label N (t - 1/N).

    The network computes in its parameters' dtype (under autocast when that is bf16 or fp16, so
    reductions stay accurate) and its output comes back in x's dtype: a sampler's state and
    updates keep their own precision. ``compile_mode`` runs a ``torch.compile``d network on
    fixed batches of ``batch`` rows (:func:`pdm.nn.runtime.compile_network`).
    """
    dtype = next(net.parameters()).dtype
    if compile_mode is not None and batch is None:
        raise ValueError("a compiled network needs its fixed batch size")
    run = net if compile_mode is None else compile_network(net, batch, compile_mode)

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
        raise ValueError(f"{path!r} holds no network config (hparams.net); it was not written by this version of "
                         "pdm's train.py")
    try:
        net = UNet(**net_cfg)
        schedule = build_schedule(hp.get("schedule", "linear"), hp.get("beta_start", 1e-4), hp.get("beta_end", 0.02),
                                  hp.get("num_timesteps", 1000))
    except TypeError as e:
        raise ValueError(f"{path!r} was written for another architecture or version: {e}") from None
    load_net_state(net, ckpt["state_dict"], path)
    n = schedule.num_timesteps
    time_range = tuple(hp.get("time_range") or (0, n - 1))
    config = {"net": net_cfg, **{k: hp.get(k) for k in SAMPLING_KEYS}}
    return Model(place(net, device, dtype).eval(), schedule, hp.get("target", "x0"), (int(time_range[0]), int(time_range[1])),
                 config)


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


def load_for_sampling(paths: list[str], guidance_scale: float = 1.0, device: str | torch.device = "cpu",
                      precision: str = "fp32", compile_mode: str | None = None,
                      batch_size: int | None = None) -> LoadedModel:
    """One checkpoint, or two expert checkpoints (high- and low-noise, in any order).

    ``precision`` is the networks' (``fp32``, ``bf16``, ``fp16``); ``compile_mode`` compiles
    them for batches of ``batch_size`` images (twice that under guidance, where the conditional
    and unconditional halves share one call).
    """
    if not 1 <= len(paths) <= 2:
        raise ValueError("pass one --ckpt, or two for a high-noise / low-noise expert pair")
    models = [load_model(p, device, precision) for p in paths]
    net_batch = None if batch_size is None else batch_size * (2 if guidance_scale != 1.0 else 1)
    model_fn = partial(network_model_fn, compile_mode=compile_mode, batch=net_batch)
    first = models[0]
    n = first.schedule.num_timesteps
    if len(models) == 2:
        high, low = _expert_pair(models)
        fn = expert_router(model_fn(high.net, high.schedule), model_fn(low.net, low.schedule),
                           first.schedule, split_label=high.time_range[0])
    else:
        if first.time_range != (0, n - 1):
            raise ValueError(f"{paths[0]!r} is an expert owning steps {first.time_range}; pass its partner "
                             "checkpoint as a second --ckpt")
        fn = model_fn(first.net, first.schedule)
    if guidance_scale != 1.0:
        if first.net.num_classes is None:
            raise ValueError("guidance needs a class-conditional model; this one is unconditional (drop --guidance-scale)")
        fn = classifier_free_guidance(fn, guidance_scale, first.net.num_classes)
    return LoadedModel(fn, first.schedule, first.target, first.net.in_channels, first.net.image_size,
                       first.net.num_classes, first.config)


def _expert_pair(models: list[Model]) -> tuple[Model, Model]:
    """(high-noise, low-noise) experts, checked to share data, schedule and target and to meet."""
    a, b = models
    checks = {"in_channels": (a.net.in_channels, b.net.in_channels), "image_size": (a.net.image_size, b.net.image_size),
              "num_classes": (a.net.num_classes, b.net.num_classes), "target": (a.target, b.target)}
    checks.update({k: (a.config.get(k), b.config.get(k)) for k in ("schedule", "beta_start", "beta_end", "num_timesteps")})
    for key, (x, y) in checks.items():
        if x != y:
            raise ValueError(f"the two experts disagree on {key} ({x} vs {y}); pass checkpoints of one expert pair")
    high, low = sorted(models, key=lambda m: -m.time_range[1])
    n = a.schedule.num_timesteps
    if low.time_range[1] + 1 != high.time_range[0] or low.time_range[0] != 0 or high.time_range[1] != n - 1:
        raise ValueError(f"expert time ranges {low.time_range} and {high.time_range} do not meet: the low-noise "
                         f"expert must own 0..k-1 and the high-noise one k..{n - 1}")
    return high, low


def main(argv: list[str] | None = None) -> None:
    """``python -m pdm.checkpoints CKPT OUT.safetensors``: export EMA weights for sample.py."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m pdm.checkpoints", description=main.__doc__)
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    try:
        print(export_safetensors(args.ckpt, args.out, args.overwrite))
    except ValueError as e:
        print(f"python -m pdm.checkpoints: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
