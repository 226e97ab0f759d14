"""Data modules: the embedded digits, image folders, Hugging Face datasets, LSUN LMDB."""

from pdm.data.datamodules import (
    DigitsDataModule,
    HFDataModule,
    ImageFolderDataModule,
    LSUNDataModule,
    load_digits_tensor,
)

__all__ = [
    "DigitsDataModule",
    "HFDataModule",
    "ImageFolderDataModule",
    "LSUNDataModule",
    "load_digits_tensor",
]
