"""LightningDataModules: embedded digits, image folders, Hugging Face datasets and LSUN LMDB."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

from pdm.data.transforms import ImageTransform

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class _Base(L.LightningDataModule):
    """Shared loader settings: batch size, workers, a seeded train/val split."""

    def __init__(self, batch_size: int, num_workers: int, val_fraction: float, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.num_workers, self.val_fraction, self.seed = batch_size, num_workers, val_fraction, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _split(self, full: Dataset) -> None:
        n_val = int(len(full) * self.val_fraction)
        if n_val == 0:
            self.train_set, self.val_set = full, None
            return
        g = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set = random_split(full, [len(full) - n_val, n_val], generator=g)

    def train_dataloader(self) -> DataLoader:
        # a seeded generator makes the shuffling order a function of (seed, epoch)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, generator=g, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


def load_digits_tensor(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 UCI handwritten digits (scikit-learn ships them offline), upsampled to
    ``image_size`` with bilinear interpolation, one channel in [-1, 1], with labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


class DigitsDataModule(_Base):
    """The embedded default dataset: 8x8 handwritten digits upsampled to 32x32, 10 classes."""

    num_classes = 10
    channels = 1

    def __init__(self, image_size: int = 32, batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.05,
                 seed: int = 0) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.image_size = image_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            x, y = load_digits_tensor(self.image_size)
            self._split(TensorDataset(x, y))


class _Files(Dataset):
    def __init__(self, files: list[Path], labels: list[int] | None, transform: ImageTransform, skip_unreadable: bool) -> None:
        self.files, self.labels, self.transform, self.skip_unreadable = files, labels, transform, skip_unreadable

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as im:
                x = self.transform(im)
        except (UnidentifiedImageError, OSError) as e:
            if not self.skip_unreadable:
                raise ValueError(f"cannot read image {self.files[i]}: {e}; delete it or set skip_unreadable: true") from None
            return self[(i + 1) % len(self)]
        return (x, self.labels[i]) if self.labels is not None else (x, -1)


class ImageFolderDataModule(_Base):
    """Images under ``root``; with ``class_conditional`` each subfolder is a class (sorted names)."""

    def __init__(self, root: str, image_size: int = 256, channels: int = 3, class_conditional: bool = False,
                 random_flip: bool = True, batch_size: int = 64, num_workers: int = 4, val_fraction: float = 0.0,
                 seed: int = 0, skip_unreadable: bool = True) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.root, self.image_size, self.channels = root, image_size, channels
        self.class_conditional, self.random_flip, self.skip_unreadable = class_conditional, random_flip, skip_unreadable
        self.classes: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = Path(self.root)
        if not root.is_dir():
            raise ValueError(f"image folder {self.root!r} does not exist; put the training images there "
                             "(one subfolder per class for class_conditional) or fix data.root")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"image folder {self.root!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        labels = None
        if self.class_conditional:
            self.classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
            if not self.classes:
                raise ValueError(f"class_conditional needs one subfolder per class under {self.root!r}")
            index = {c: i for i, c in enumerate(self.classes)}
            files = [p for p in files if len(p.relative_to(root).parts) > 1]
            labels = [index[p.relative_to(root).parts[0]] for p in files]
        transform = ImageTransform(self.image_size, self.channels, self.random_flip)
        self._split(_Files(files, labels, transform, self.skip_unreadable))


class _HFImages(Dataset):
    def __init__(self, ds, image_key: str, label_key: str | None, transform: ImageTransform) -> None:
        self.ds, self.image_key, self.label_key, self.transform = ds, image_key, label_key, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[i]
        x = self.transform(row[self.image_key])
        return (x, int(row[self.label_key])) if self.label_key else (x, -1)


class HFDataModule(_Base):
    """A Hugging Face ``datasets`` image dataset, by hub name (from the local cache) or by a
    path saved with ``save_to_disk`` (e.g. CIFAR-10 ``uoft-cs/cifar10``, ImageNet-1k, LSUN Church)."""

    def __init__(self, name: str, split: str = "train", image_key: str = "img", label_key: str | None = None,
                 image_size: int = 32, channels: int = 3, random_flip: bool = True, batch_size: int = 128,
                 num_workers: int = 4, val_fraction: float = 0.0, seed: int = 0) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.image_size, self.channels, self.random_flip = image_size, channels, random_flip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        import datasets

        try:
            if os.path.isdir(self.name):
                ds = datasets.load_from_disk(self.name)
                ds = ds[self.split] if isinstance(ds, datasets.DatasetDict) else ds
            else:
                ds = datasets.load_dataset(self.name, split=self.split)
        except Exception as e:  # noqa: BLE001 - offline or unknown dataset
            raise ValueError(
                f"cannot load dataset {self.name!r} (split {self.split!r}): {type(e).__name__}: {e}. Download it "
                f"on a machine with internet (datasets.load_dataset({self.name!r}).save_to_disk(DIR)) and set "
                "data.name to DIR"
            ) from None
        if self.image_key not in ds.column_names:
            raise ValueError(f"dataset {self.name!r} has no column {self.image_key!r}; columns: {ds.column_names}")
        transform = ImageTransform(self.image_size, self.channels, self.random_flip)
        self._split(_HFImages(ds, self.image_key, self.label_key, transform))


class LSUNDataModule(_Base):
    """LSUN scenes from their LMDB folders through torchvision (needs ``pip install lmdb``)."""

    def __init__(self, root: str, classes: str = "church_outdoor_train", image_size: int = 256, random_flip: bool = True,
                 batch_size: int = 64, num_workers: int = 4, seed: int = 0) -> None:
        super().__init__(batch_size, num_workers, 0.0, seed)
        self.root, self.classes, self.image_size, self.random_flip = root, classes, image_size, random_flip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        lmdb_dir = Path(self.root) / f"{self.classes}_lmdb"
        if not lmdb_dir.is_dir():
            raise ValueError(f"LSUN LMDB folder {lmdb_dir} is missing; download {self.classes}_lmdb.zip with the "
                             f"LSUN download script and unzip it into {self.root}")
        from torchvision.datasets import LSUN

        transform = ImageTransform(self.image_size, 3, self.random_flip)
        self._split(LSUN(self.root, classes=[self.classes], transform=transform))
