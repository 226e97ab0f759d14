"""Shared fixtures and constants: tiny trained checkpoints (a few optimiser steps on the embedded
digits), the repository root, the small-network overrides of the CLI tests, and a model wrapper
that counts network calls."""

import os

import lightning as L
import pytest

from pdm.data import DigitsDataModule
from pdm.nn import UNet
from pdm.training import EMA, PDMModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# train.py overrides that shrink the digits config's network for CLI tests (a few seconds per run)
SMALL_NET_ARGS = [
    "--model.net.init_args.model_channels",
    "16",
    "--model.net.init_args.channel_mult",
    "[1]",
    "--model.net.init_args.attention_resolutions",
    "[]",
]


def run_main(module, args, capsys) -> tuple[int, list[str]]:
    """A script's ``main(argv)`` in this process: (exit code, stderr lines without blank lines and
    progress output)."""
    capsys.readouterr()
    try:
        module.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.splitlines()
    return code, [
        line
        for line in err
        if line.strip() and not line.startswith(("images ", "calibration: ", "\r"))
    ]


TINY_NET = dict(
    in_channels=1,
    image_size=16,
    patch_size=4,
    model_channels=32,
    channel_mult=(1,),
    num_res_blocks=1,
    attention_resolutions=(),
)
NET_KEYS = set(TINY_NET) | {"num_classes", "dropout"}


def tiny_module(cls=PDMModule, **kwargs) -> PDMModule:
    """A tiny PDMModule (16x16 digits, P = 4); network and module arguments may be mixed."""
    net = {k: kwargs.pop(k) for k in list(kwargs) if k in NET_KEYS}
    return cls(net=UNet(**{**TINY_NET, **net}), **{"warmup_steps": 1, **kwargs})


def train_tiny(root: str, steps: int = 3, **kwargs) -> str:
    """Train a tiny model for a few steps and return the path of its last checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    ckpt_dir = os.path.join(root, "checkpoints")
    trainer = L.Trainer(
        max_steps=steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        callbacks=[EMA(decay=0.9), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )
    size = kwargs.get("image_size", TINY_NET["image_size"])
    trainer.fit(
        tiny_module(**kwargs),
        datamodule=DigitsDataModule(image_size=size, batch_size=16, val_fraction=0.0),
    )
    return os.path.join(ckpt_dir, "last.ckpt")


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """Checkpoints: a class-conditional model, an unconditional one, and a high/low-noise expert pair."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "cond": train_tiny(str(root / "cond"), num_classes=10, lr=1e-3),
        "uncond": train_tiny(str(root / "uncond"), lr=1e-3),
        "high": train_tiny(str(root / "high"), num_classes=10, time_range=(396, 999)),
        "low": train_tiny(str(root / "low"), num_classes=10, time_range=(0, 395)),
        "low_gap": train_tiny(str(root / "low_gap"), num_classes=10, time_range=(0, 300)),
    }
