"""Train a Patched Diffusion Model: ``python train.py fit --config configs/digits.yaml``.

LightningCLI builds the model (with its network from ``model.net``), data, trainer and
callbacks from the YAML. A run owns its ``--trainer.default_root_dir``: checkpoints go to
``<default_root_dir>/checkpoints`` (written atomically), logs and the saved config under
``lightning_logs/version_N``. ``--ckpt_path last`` resumes that run's latest checkpoint; a fresh
run into a folder that already holds checkpoints stops, so no run overwrites another's. Any
mistake in the config stops the run before any work, with a one-line error and exit code 2.
"""

import argparse
import logging
import os
import sys

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI

from pdm.atomic import WriteError
from pdm.checkpoints import AtomicCheckpointIO, training_checkpoint
from pdm.training import PDMModule, Preemption

CHECKPOINT_CALLBACKS = ("pdm.training.RunCheckpoint", "lightning.pytorch.callbacks.ModelCheckpoint", "ModelCheckpoint",
                        "RunCheckpoint")


class PDMCLI(LightningCLI):
    """LightningCLI with pdm's run rules, checked on the parsed config before anything is built."""

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyper-parameters here, before any hook: check the file first
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last", "hpc", "best", "registry"):
            training_checkpoint(os.fspath(ckpt_path))
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        cfg = self.config[self.subcommand]
        if cfg.get("ckpt_path") is None:
            for folder in _checkpoint_folders(cfg):
                if os.path.isdir(folder) and any(f.endswith(".ckpt") for f in os.listdir(folder)):
                    raise ValueError(f"{folder} already holds checkpoints of another run; resume it with "
                                     "--ckpt_path last, or start a new run with another --trainer.default_root_dir")

    def instantiate_trainer(self, **kwargs):
        _check_data_fits_network(self.datamodule, self.model)  # data and model exist; the Trainer, not yet
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # set here, so saved configs stay plain and re-run
            strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(cb, Preemption) for cb in self.trainer.callbacks):
            # SIGTERM / SIGUSR1 / SIGINT: finish the step, save last.ckpt, exit 128 + signal (requeue under SLURM)
            self.trainer.callbacks.append(Preemption())


def _checkpoint_folders(cfg) -> list[str]:
    """Where the configured checkpoint callbacks will write."""
    root = cfg.trainer.get("default_root_dir") or os.getcwd()
    folders = []
    for cb in cfg.trainer.get("callbacks") or []:
        class_path = getattr(cb, "class_path", "")
        if class_path in CHECKPOINT_CALLBACKS or class_path.endswith(("ModelCheckpoint", "RunCheckpoint")):
            dirpath = (cb.get("init_args") or {}).get("dirpath")
            folders.append(str(dirpath) if dirpath else os.path.join(str(root), "checkpoints"))
    return folders


def _check_data_fits_network(data, model) -> None:
    """The data's image size and channels must be the network's (a mismatch would train garbage)."""
    net = getattr(model, "net", None)
    for key, net_key in (("image_size", "image_size"), ("channels", "in_channels")):
        have, want = getattr(data, key, None), getattr(net, net_key, None)
        if have is not None and want is not None and have != want:
            raise ValueError(f"the data has {key}={have} but the network was built for {net_key}={want}; "
                             f"set model.net.init_args.{net_key}: {have} (or data.init_args.{key}: {want})")


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def main() -> None:
    """Run LightningCLI on :class:`pdm.training.PDMModule` with any LightningDataModule."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertisements())
    try:
        PDMCLI(PDMModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True},
               parser_kwargs={"exit_on_error": False})
    except (ValueError, argparse.ArgumentError, WriteError) as e:
        cause = e
        while cause.__cause__ is not None and isinstance(cause.__cause__, ValueError):
            cause = cause.__cause__
        text = str(cause)
        if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own message
            text = text.strip().splitlines()[-1].split(": ", 1)[-1]
        message = " ".join(text.split())  # one line, whatever the parser's layout
        hint = "; see `python train.py fit --help`" if isinstance(e, argparse.ArgumentError) else ""
        print(f"train.py: error: {message}{hint}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
