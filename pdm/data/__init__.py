"""Data modules: the embedded digits, crops of scikit-learn's photographs, image folders, Hugging
Face datasets, LSUN LMDB."""

from pdm.data.datamodules import (
    DigitsDataModule,
    HFDataModule,
    ImageFolderDataModule,
    LSUNDataModule,
    load_digits_tensor,
)
from pdm.data.photos import PhotoCropsDataModule

__all__ = [
    "DigitsDataModule",
    "HFDataModule",
    "ImageFolderDataModule",
    "LSUNDataModule",
    "PhotoCropsDataModule",
    "load_digits_tensor",
]
