"""Loading checkpoints without executing code, and exporting EMA weights to safetensors."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pdm.images import default_file_mode


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``; refuse anything else with a clear message."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist; pass the path of a .ckpt file written by train.py")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
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


def load_net_state(net: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written file.

    The checkpoint goes to a temporary file in the target folder, is flushed to disk, and then
    renamed over the target (``os.replace`` is atomic on POSIX). A kill at any moment leaves
    either the previous checkpoint or the new one, never a truncated file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, default_file_mode())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def export_safetensors(ckpt_path: str, out_path: str) -> str:
    """Write the checkpoint's EMA network weights to safetensors, with the model config as metadata."""
    from safetensors.torch import save_file

    from pdm.images import atomic_write

    ckpt = load_checkpoint(ckpt_path)
    tensors = {k: v.contiguous() for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    from pdm.training.module import PDMModule

    config = PDMModule.config_from(dict(ckpt.get("hyper_parameters") or {}))
    metadata = {"pdm_config": json.dumps(config), "format": "pdm-ema-v1", "global_step": str(ckpt.get("global_step", ""))}
    atomic_write(out_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return out_path


def load_safetensors(path: str) -> dict[str, Any]:
    """Read an exported file back as {"state_dict", "hyper_parameters"} (no code can run: plain tensors + JSON)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from None
    if "pdm_config" not in metadata:
        raise ValueError(f"{path!r} has no pdm model config; export it with `python -m pdm.export`")
    return {"state_dict": state, "hyper_parameters": json.loads(metadata["pdm_config"])}


def main(argv: list[str] | None = None) -> None:
    """``python -m pdm.checkpoints CKPT OUT.safetensors``: export EMA weights for sample.py."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("ckpt")
    p.add_argument("out")
    args = p.parse_args(argv)
    try:
        print(export_safetensors(args.ckpt, args.out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
