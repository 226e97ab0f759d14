"""Train a Patched Diffusion Model: ``python train.py fit --config configs/digits.yaml``.

LightningCLI builds the model, data, trainer and callbacks from the YAML; ``--ckpt_path last``
resumes with the optimiser, EMA, step count and data position. Checkpoints are written
atomically. A mistake in the config (bad patch size, missing dataset, ...) stops the run at
once with a one-line error and exit code 2.
"""

import sys

from lightning.pytorch.cli import LightningCLI

from pdm.checkpoints import AtomicCheckpointIO
from pdm.training import PDMModule


def main() -> None:
    """Run LightningCLI on :class:`pdm.training.PDMModule` with any LightningDataModule."""
    try:
        LightningCLI(PDMModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True},
                     trainer_defaults={"plugins": [AtomicCheckpointIO()]})
    except ValueError as e:
        cause = e
        while cause.__cause__ is not None and isinstance(cause.__cause__, ValueError):
            cause = cause.__cause__
        print(f"train.py: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
