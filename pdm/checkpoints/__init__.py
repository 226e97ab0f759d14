"""Checkpoints: reading without running code (:mod:`~pdm.checkpoints.reading`), atomic saving and
safetensors exports (:mod:`~pdm.checkpoints.writing`), and trained models rebuilt for sampling,
expert pairs included (:mod:`~pdm.checkpoints.models`).

    python -m pdm.checkpoints CKPT OUT.safetensors [--schedule FILE]  # export EMA weights (and schedules)
    python -m pdm.checkpoints convert OFFICIAL.pt OUT.safetensors --config configs/lsun_church_p4.yaml
"""

from pdm.checkpoints.models import (
    LoadedModel,
    Model,
    load_for_sampling,
    load_model,
    network_model_fn,
)
from pdm.checkpoints.reading import (
    SAFETENSORS_HINT,
    SAMPLING_KEYS,
    is_safetensors,
    load_checkpoint,
    load_checkpoint_state,
    load_net_state,
    load_safetensors,
    training_checkpoint,
)
from pdm.checkpoints.writing import (
    EXPORT_FORMAT,
    AtomicCheckpointIO,
    export_official,
    export_safetensors,
)

__all__ = [
    "EXPORT_FORMAT",
    "SAFETENSORS_HINT",
    "SAMPLING_KEYS",
    "AtomicCheckpointIO",
    "LoadedModel",
    "Model",
    "export_official",
    "export_safetensors",
    "is_safetensors",
    "load_checkpoint",
    "load_checkpoint_state",
    "load_for_sampling",
    "load_model",
    "load_net_state",
    "load_safetensors",
    "network_model_fn",
    "training_checkpoint",
]
