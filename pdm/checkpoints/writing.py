"""Writing checkpoints: Lightning's checkpoint IO made atomic, and the safetensors exports that
``sample.py`` reads (a training checkpoint's EMA weights, or official PatchDiffusion-Pytorch
weights converted onto pdm's network)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pdm.atomic import atomic_write, file_sha256
from pdm.checkpoints.reading import SAMPLING_KEYS, load_checkpoint, load_checkpoint_state
from pdm.nn import UNet
from pdm.sampling.learned import EMBEDDED_KEY, ScheduleFile

EXPORT_FORMAT = "pdm-ema-v2"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO through :func:`pdm.atomic.atomic_write`: a kill at any moment
    leaves either the previous checkpoint or the new one, never a truncated file."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def export_safetensors(
    ckpt_path: str,
    out_path: str,
    overwrite: bool = False,
    schedules: str | None = None,
    force: bool = False,
) -> str:
    """Write the checkpoint's EMA network weights to safetensors, with the model config as metadata.

    Refuses to write over its input, to a name without ``.safetensors`` (sample.py reads
    exports by that name) and over an existing file unless ``overwrite``. ``schedules``, a schedule
    file of calibrate.py for this checkpoint (``force``: for any), travels inside the export
    (``sample.py --schedule embedded`` replays it).
    """
    from safetensors.torch import save_file

    if not out_path.endswith(".safetensors"):
        raise ValueError(f"export to a name ending in .safetensors, not {out_path!r}")
    if (
        os.path.exists(out_path)
        and os.path.exists(ckpt_path)
        and os.path.samefile(ckpt_path, out_path)
    ):
        raise ValueError(
            f"{out_path!r} is the checkpoint being exported; choose another output name"
        )
    if os.path.exists(out_path) and not overwrite:
        raise ValueError(f"{out_path!r} exists; choose another name or pass --overwrite")
    ckpt = load_checkpoint(ckpt_path)
    hp = dict(ckpt.get("hyper_parameters") or {})
    config = {k: hp[k] for k in ("net", *SAMPLING_KEYS) if k in hp}
    if "net" not in config:
        raise ValueError(
            f"{ckpt_path!r} holds no network config; export a checkpoint written by pdm's train.py"
        )
    tensors = {k: v.contiguous() for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    metadata = {
        "pdm_config": json.dumps(config),
        "format": EXPORT_FORMAT,
        "global_step": str(ckpt.get("global_step", "")),
    }
    if schedules is not None:
        metadata[EMBEDDED_KEY] = _schedules_for(schedules, ckpt_path, force)
    atomic_write(out_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return out_path


def _schedules_for(path: str, ckpt_path: str, force: bool) -> str:
    """The schedule file's text (in today's format), checked to be calibrated for ``ckpt_path``
    unless ``force``."""
    found = ScheduleFile.load(path)
    made_for = sorted(found.calibrated_for.get("checkpoints") or [])
    digest = file_sha256(ckpt_path)
    if made_for and made_for != [digest] and not force:
        raise ValueError(
            f"{path} was calibrated for sha256 {', '.join(h[:8] + '...' for h in made_for)}, not "
            f"{ckpt_path} (sha256 {digest[:8]}...); calibrate this checkpoint, or pass --force"
        )
    return found.to_json()


def export_official(
    official_path: str, config_path: str, out_path: str, overwrite: bool = False
) -> str:
    """Convert an official PatchDiffusion-Pytorch state dict into an export ``sample.py`` reads.

    ``config_path`` is a pdm config (YAML) describing the same network (``model.net``) and
    diffusion (``model.schedule``, ``beta_*``, ``target``, ...). The official ``.pt`` is read
    with ``weights_only=True``; the converted weights must load into that network strictly.
    """
    import yaml
    from safetensors.torch import save_file

    from pdm.nn import convert_official_state_dict

    if not out_path.endswith(".safetensors"):
        raise ValueError(
            f"write the converted weights to a name ending in .safetensors, not {out_path!r}"
        )
    if os.path.exists(out_path) and not overwrite:
        raise ValueError(f"{out_path!r} exists; choose another name or pass --overwrite")
    try:
        with open(config_path) as f:
            model_cfg = (yaml.safe_load(f) or {}).get("model") or {}
        net_cfg = dict(model_cfg["net"]["init_args"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(
            f"{config_path!r} is not a pdm config with model.net.init_args ({e}); pass e.g. "
            "configs/lsun_church_p4.yaml"
        ) from None
    try:
        net = UNet(**net_cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the model.net of {config_path!r} is not a valid UNet: {e}") from None
    state = load_checkpoint_state(official_path)
    try:
        net.load_state_dict(convert_official_state_dict(state), strict=True)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"{official_path!r} does not fit the network of {config_path!r}: "
            f"{str(e).splitlines()[0]}; pass the config the model was trained with"
        ) from None
    config = {
        "net": {"class_path": "pdm.nn.UNet", "init_args": net_cfg},
        **{k: model_cfg[k] for k in SAMPLING_KEYS if k in model_cfg},
    }
    tensors = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
    metadata = {
        "pdm_config": json.dumps(config),
        "format": EXPORT_FORMAT,
        "converted_from": os.path.basename(official_path),
    }
    atomic_write(out_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return out_path
