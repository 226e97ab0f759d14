"""The config each run of a patch-size ablation trains: the base config with train.py's overlays
and overrides applied as LightningCLI applies them, and the network changed to one patch size."""

from __future__ import annotations

from pathlib import Path

import yaml


def _read_yaml(path: str) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except OSError:
        raise ValueError(
            f"--config {path} does not exist; name a training config, e.g. configs/digits.yaml"
        ) from None


def _merge(base: dict, top: dict) -> dict:
    """``top`` layered on ``base`` as LightningCLI layers configs (mappings merge, the rest replaces)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str, extra: list[str] = ()) -> dict:
    """The config as train.py will see it: ``path``, then the ``--config`` overlays and the dotted
    ``--section.key=value`` overrides among ``extra`` (a ValueError names a missing file)."""
    config = _read_yaml(path)
    items = list(extra)
    i = 0
    while i < len(items):
        flag = items[i]
        if not flag.startswith("--"):
            i += 1
            continue
        name, eq, value = flag[2:].partition("=")
        if not eq:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                i += 1
                continue
            value = items[i + 1]
            i += 1
        i += 1
        if name == "config":
            config = _merge(config, _read_yaml(value))
        elif name.split(".")[0] in ("model", "data") and "+" not in name:
            *parents, leaf = name.split(".")
            node = config
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = yaml.safe_load(value)
    return config


def net_for(config: dict, patch_size: int) -> dict:
    """The config's network arguments at ``patch_size``: the attention kept on the same levels."""
    net = dict(config["model"]["net"]["init_args"])
    size, base = net["image_size"], net.get("patch_size", 1)
    if size % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide the image size {size}")
    levels = len(net.get("channel_mult", (1,)))
    grid, base_grid = size // patch_size, size // base
    if grid % 2 ** (levels - 1):
        raise ValueError(
            f"at patch size {patch_size} the {grid}x{grid} grid cannot be halved {levels - 1} times"
        )
    attention = [
        i for i in range(levels) if base_grid // 2**i in set(net.get("attention_resolutions", ()))
    ]
    return {
        **net,
        "patch_size": patch_size,
        "attention_resolutions": [grid // 2**i for i in attention],
    }


def is_digits(config: dict) -> bool:
    """Whether the config trains on the embedded digits."""
    return ((config.get("data") or {}).get("class_path") or "").endswith("DigitsDataModule")


def batch_size(config: dict) -> int:
    """The config's batch size (per device)."""
    return int(((config.get("data") or {}).get("init_args") or {}).get("batch_size", 64))


def check_data(config: dict) -> None:
    """The dataset is there (or one line naming the script that prepares it) before any run starts."""
    import importlib

    section = config.get("data") or {}
    module, _, name = section.get("class_path", "").rpartition(".")
    if not module:
        return
    data = getattr(importlib.import_module(module), name)(**(section.get("init_args") or {}))
    data.setup("fit")
