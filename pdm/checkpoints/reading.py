"""Reading checkpoints without running code: Lightning training checkpoints (``.ckpt``),
safetensors exports and official ``.pt`` state dicts. Anything else is a ValueError that says
what the file is and what to pass instead.

A training checkpoint is Lightning's: ``state_dict`` holds the EMA weights (Lightning's
WeightAveraging writes them there), ``current_model_state`` the raw ones, and
``hyper_parameters`` the module's settings with the network config under ``net``. Exports are
safetensors files with the same settings as JSON metadata.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import torch
from torch import Tensor, nn

SAMPLING_KEYS = ("schedule", "beta_start", "beta_end", "num_timesteps", "target", "time_range")
SAFETENSORS_HINT = "export weights with `python -m pdm.checkpoints CKPT OUT.safetensors`"


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


CHECKPOINT_FORMAT = 1  # checkpoint["pdm_format"] of the .ckpt files train.py writes
EXPORT_VERSION = 2  # the safetensors exports' metadata "format": "pdm-ema-v2"


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """A pdm checkpoint (.ckpt written by train.py) or export (.safetensors), loaded without
    running code: ``torch.load(weights_only=True)`` refuses pickles that would. Anything else is
    a ValueError that says what the file is and what to pass instead."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"{path!r} is a folder; pass the checkpoint file inside it (e.g. {_example_inside(path)})"
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"checkpoint {path!r} does not exist; pass the path of a .ckpt file written by train.py"
        )
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} is empty (0 bytes); pass a complete checkpoint")
    if is_safetensors(path):
        return load_safetensors(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "WeightsUnpickler error" in str(e) or "Unsupported global" in str(e):
            raise ValueError(
                f"{path!r} is not a plain-weights checkpoint: loading it would unpickle arbitrary objects "
                "(run code), which is refused; use a checkpoint written by pdm's train.py"
            ) from None
        raise ValueError(
            f"{path!r} is not a readable PyTorch checkpoint (truncated or another format)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a checkpoint"
        raise ValueError(
            f"{path!r} is not a readable PyTorch checkpoint ({type(e).__name__}); it may be truncated"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(
            f"{path!r} is not a pdm checkpoint (no state_dict); pass a .ckpt written by train.py"
        )
    _check_version(path, int(ckpt.get("pdm_format", 1)), CHECKPOINT_FORMAT, "checkpoint format")
    return ckpt


def _check_version(path: str, found: int, readable: int, what: str) -> None:
    """A file written by a newer pdm is refused in one line naming the version it needs."""
    if found > readable:
        raise ValueError(
            f"{path!r} was written by a newer pdm ({what} {found}; this pdm reads up to "
            f"{readable}); upgrade pdm to read it"
        )


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
    version = str(metadata.get("format", "pdm-ema-v1")).rpartition("-v")[2]
    _check_version(path, int(version) if version.isdigit() else 1, EXPORT_VERSION, "export format")
    return {
        "state_dict": state,
        "hyper_parameters": json.loads(metadata["pdm_config"]),
        "format": "safetensors",
    }


def load_net_state(net: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load the ``net.*`` tensors of a checkpoint into ``net``; any mismatch is a ValueError naming the file."""
    state = {k[len("net.") :]: v for k, v in state_dict.items() if k.startswith("net.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        shapes = str(e).count("size mismatch")
        raise ValueError(
            f"{source!r} holds a different architecture ({shapes} tensors of other shapes); use a "
            "checkpoint of the same network config"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{source!r} holds a different architecture (missing {len(missing)}, unexpected "
            f"{len(unexpected)} tensors); use a checkpoint of the same network config"
        )


def training_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint train.py can resume: a .ckpt with optimiser and loop state (not an export)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") == "safetensors" or "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ValueError(
            f"{path!r} holds weights only (an export), not a training state; resume from a .ckpt in "
            "the run's checkpoints/ folder"
        )
    return ckpt


def load_checkpoint_state(path: str) -> dict[str, Tensor]:
    """A plain state dict from a ``.pt`` file, read without running code (``state_dict`` / ``model``
    wrappers are unwrapped)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path!r} asks to run code when loaded; it is refused (only plain tensors are read)"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{path!r} is not a readable PyTorch file: {str(e).splitlines()[0]}"
        ) from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} holds no state dict of tensors")
    return obj


def _example_inside(folder: str) -> str:
    """A checkpoint file a user probably meant: the newest step file or last.ckpt in the folder (or
    its checkpoints/ subfolder)."""
    for where in (folder, os.path.join(folder, "checkpoints")):
        if os.path.isdir(where):
            found = sorted(f for f in os.listdir(where) if f.endswith((".ckpt", ".safetensors")))
            if found:
                steps = [f for f in found if f.startswith("step")]
                return os.path.join(where, (steps or found)[-1])
    inside = (
        folder
        if os.path.basename(os.path.normpath(folder)) == "checkpoints"
        else os.path.join(folder, "checkpoints")
    )
    return os.path.join(inside, "last.ckpt")
