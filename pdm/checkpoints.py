"""Loading checkpoints without executing code, and exporting EMA weights to safetensors."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``; refuse anything else with a clear message."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist; pass the path of a .ckpt file written by train.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path!r} is not a plain-weights checkpoint (it asks to run code while loading, which is refused): {e}"
        ) from None
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a checkpoint"
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path!r} is not a pdm checkpoint (no state_dict); pass a .ckpt written by train.py")
    return ckpt
