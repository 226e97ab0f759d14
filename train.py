"""Train a Patched Diffusion Model: ``python train.py fit --config configs/digits.yaml``.

LightningCLI builds the model (with its network from ``model.net``), data, trainer and
callbacks from the YAML. A run owns its ``--trainer.default_root_dir``: checkpoints go to
``<default_root_dir>/checkpoints`` (written atomically), logs and the saved config under
``lightning_logs/version_N``. ``--ckpt_path last`` resumes that run's latest checkpoint; a fresh
run into a folder that already holds checkpoints stops, so no run overwrites another's. Any
mistake in the config stops the run at once with a one-line error and exit code 2.
"""

import argparse
import os
import sys

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from pdm.checkpoints import AtomicCheckpointIO, training_checkpoint
from pdm.training import PDMModule, RunCheckpoint


class PDMCLI(LightningCLI):
    """LightningCLI with pdm's run rules, applied before any work starts."""

    def before_fit(self) -> None:
        trainer, ckpt_path = self.trainer, self.config_init[self.subcommand].get("ckpt_path")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # configured here, so saved configs re-run
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if ckpt_path not in (None, "last", "hpc", "best", "registry"):
            training_checkpoint(os.fspath(ckpt_path))  # a clear error now beats a traceback after setup
        if ckpt_path is None:
            for cb in trainer.checkpoint_callbacks:
                folder = cb.folder(trainer) if isinstance(cb, RunCheckpoint) else (cb.dirpath if isinstance(cb, ModelCheckpoint) else None)
                if folder and os.path.isdir(folder) and any(f.endswith(".ckpt") for f in os.listdir(folder)):
                    raise ValueError(f"{folder} already holds checkpoints of another run; resume it with --ckpt_path last, "
                                     "or start a new run with another --trainer.default_root_dir")


def main() -> None:
    """Run LightningCLI on :class:`pdm.training.PDMModule` with any LightningDataModule."""
    try:
        PDMCLI(PDMModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True},
               parser_kwargs={"exit_on_error": False})
    except (ValueError, argparse.ArgumentError) as e:
        cause = e
        while cause.__cause__ is not None and isinstance(cause.__cause__, ValueError):
            cause = cause.__cause__
        message = " ".join(str(cause).split())  # one line, whatever the parser's layout
        hint = "; see `python train.py fit --help`" if isinstance(e, argparse.ArgumentError) else ""
        print(f"train.py: error: {message}{hint}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
