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


# -- the axis an ablation varies -----------------------------------------------------------------

PATCH_KEYS = ("patch_size", "model.net.init_args.patch_size", "model.patch_size")
# the paper's names for the prediction targets, and the config's
KEY_ALIASES = {"model.prediction": "model.target"}
VALUE_ALIASES = {"model.target": {"x": "x0", "epsilon": "eps"}}


def canonical_key(key: str) -> str:
    """The config key an axis name stands for (``patch_size`` for the patch-size axis)."""
    if key in PATCH_KEYS:
        return "patch_size"
    return KEY_ALIASES.get(key, key)


def parse_value(key: str, text: str):
    """A command-line value of axis ``key`` as the config holds it (int, float, bool or text)."""
    text = VALUE_ALIASES.get(key, {}).get(text, text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def get_key(config: dict, key: str):
    """The value at dotted ``key`` of a config (None where it is not set)."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def nested(key: str, value) -> dict:
    """``{'a': {'b': value}}`` for ``key = 'a.b'``."""
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def axis_overlay(config: dict, key: str, value) -> tuple[dict, dict]:
    """The config overlay that sets axis ``key`` to ``value``, and what the change forces besides.

    Patch size: the attention stays on the same U-Net levels (so every P has the same
    parameters). A prediction target (``model.target``): nothing else; the loss weighting stays
    on the x0 error, so targets are compared under one objective. Any other dotted key: itself.
    """
    if key == "patch_size":
        net = net_for(config, int(value))
        forced = {"attention_resolutions": net["attention_resolutions"]}
        overlay = {"model": {"net": {"init_args": {"patch_size": int(value), **forced}}}}
        return overlay, forced
    if key.split(".")[0] not in ("model", "data", "trainer", "seed_everything"):
        raise ValueError(
            f"--vary {key}: name a config key under model., data. or trainer. "
            "(e.g. model.target, model.weighting) or patch_size"
        )
    if key == "model.target":
        from pdm.objectives import check_target

        check_target(value)
    return nested(key, value), {}


def data_takes(config: dict, name: str) -> bool:
    """Whether the config's data module accepts the argument ``name``."""
    import importlib
    import inspect

    section = config.get("data") or {}
    module, _, cls = (section.get("class_path") or "").rpartition(".")
    if not module:
        return False
    try:
        target = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return False
    return name in inspect.signature(target.__init__).parameters


def seed_overlay(config: dict, seed_index: int) -> dict:
    """The overlay of repeat ``seed_index``: 0 is the config as it is; repeat s adds s to the
    run's seed (initialisation and training noise) and to the data order's seed, leaving the
    data module's ``seed`` (its train/held-out split) alone."""
    if seed_index == 0:
        return {}
    base = int(config.get("seed_everything") or 0)
    overlay: dict = {"seed_everything": base + seed_index}
    if data_takes(config, "shuffle_seed"):
        data_seed = int(((config.get("data") or {}).get("init_args") or {}).get("seed", 0))
        overlay["data"] = {"init_args": {"shuffle_seed": data_seed + seed_index}}
    return overlay


def merge(base: dict, top: dict) -> dict:
    """``top`` layered on ``base`` as LightningCLI layers configs."""
    return _merge(base, top)
