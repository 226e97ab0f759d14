"""LightningDataModules: embedded digits, image folders, Hugging Face datasets and LSUN LMDB."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, random_split

from pdm.data.transforms import ImageTransform

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that is a function of (seed, epoch), and can resume part-way through an epoch.

    Lightning calls ``set_epoch`` before each epoch. ``resume(epoch, n)`` drops the first n
    indices of that epoch once, so a run resumed mid-epoch continues where it stopped.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        self._resume = (epoch, samples_done)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1]:]
            self._resume = None
        return iter(order)

    def __len__(self) -> int:
        return self.size


class _Base(L.LightningDataModule):
    """Shared loader settings: batch size, workers, a seeded train/val split.

    The training order is a function of (seed, epoch); the number of batches consumed in the
    current epoch is saved in every checkpoint, so a single-process run resumed mid-epoch sees
    exactly the batches the uninterrupted run would have seen. (Under DDP, Lightning shards
    with its distributed sampler, seeded per epoch, and a resumed epoch starts over.)
    """

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
        sampler = EpochShuffleSampler(len(self.train_set), self.seed)
        resume = getattr(self, "_resume_state", None)
        if resume:
            sampler.resume(resume["epoch"], resume["batches_done"] * self.batch_size)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def state_dict(self) -> dict:
        """Where training stands in the data: the epoch and the batches of it already trained on."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches_done": int(done) % max(1, trainer.num_training_batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Remember the position to resume from (applied when the train loader is built)."""
        self._resume_state = state_dict or None

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
        self.skipped = 0  # unreadable files met so far (per worker process)

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
            self.skipped += 1
            warnings.warn(f"skipped unreadable image {self.files[i]} ({self.skipped} so far in this worker)", stacklevel=2)
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
    """A Hugging Face ``datasets`` image dataset saved with ``save_to_disk`` (e.g. CIFAR-10 from
    ``uoft-cs/cifar10``, ImageNet-1k, LSUN Church). With ``allow_download`` a hub name is loaded
    through ``datasets.load_dataset`` (from its cache, or downloaded where there is internet)."""

    def __init__(self, name: str, split: str = "train", image_key: str = "img", label_key: str | None = None,
                 image_size: int = 32, channels: int = 3, random_flip: bool = True, batch_size: int = 128,
                 num_workers: int = 4, val_fraction: float = 0.0, seed: int = 0, allow_download: bool = False) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.allow_download = allow_download
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.image_size, self.channels, self.random_flip = image_size, channels, random_flip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        import datasets

        if not os.path.isdir(self.name) and not self.allow_download:
            raise ValueError(
                f"dataset folder {self.name!r} does not exist. On a machine with internet run "
                f"`datasets.load_dataset(HUB_NAME).save_to_disk({self.name!r})` (CIFAR-10: uoft-cs/cifar10) and copy "
                "the folder here, or set data.init_args.allow_download: true to use the Hugging Face hub"
            )
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
