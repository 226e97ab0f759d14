"""Train a Patched Diffusion Model: ``python train.py fit --config configs/digits.yaml``.

LightningCLI builds the model, data, trainer and callbacks from the YAML; ``--ckpt_path last``
resumes with the optimiser, EMA and step count.
"""

from lightning.pytorch.cli import LightningCLI

from pdm.training import PDMModule


def main() -> None:
    """Run LightningCLI on :class:`pdm.training.PDMModule` with any LightningDataModule."""
    LightningCLI(PDMModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
