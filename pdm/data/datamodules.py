"""LightningDataModules: embedded digits, image folders, Hugging Face datasets and LSUN LMDB."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from pdm.data.decoding import ImageSource
from pdm.data.loading import DataModuleBase
from pdm.data.transforms import ImageTransform

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def load_digits_tensor(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 UCI handwritten digits (scikit-learn ships them offline), upsampled to
    ``image_size`` with bilinear interpolation, one channel in [-1, 1], with labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


class DigitsDataModule(DataModuleBase):
    """The embedded default dataset: 8x8 handwritten digits upsampled to 32x32, 10 classes."""

    num_classes = 10
    channels = 1

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        seed: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed, shuffle_seed=shuffle_seed)
        self.image_size = image_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            x, y = load_digits_tensor(self.image_size)
            self._split(TensorDataset(x, y))


class _Files(ImageSource):
    def __init__(
        self, files: list[Path], labels: list[int] | None, transform: ImageTransform
    ) -> None:
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            x = self.transform(im)
        return (x, self.labels[i]) if self.labels is not None else (x, -1)

    def describe(self, i: int) -> str:
        return str(self.files[i])


class ImageFolderDataModule(DataModuleBase):
    """Images under ``root``; with ``class_conditional`` each subfolder is a class (sorted names).
    An unreadable image stops the run unless ``skip_bad_images`` (see :mod:`pdm.data.decoding`)."""

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        channels: int = 3,
        class_conditional: bool = False,
        random_flip: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        val_fraction: float = 0.0,
        seed: int = 0,
        skip_bad_images: bool = False,
        max_bad_fraction: float = 0.01,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(
            batch_size,
            num_workers,
            val_fraction,
            seed,
            skip_bad_images,
            max_bad_fraction,
            shuffle_seed,
        )
        self.root, self.image_size, self.channels = root, image_size, channels
        self.class_conditional, self.random_flip = class_conditional, random_flip
        self.classes: list[str] = []
        self._check_root()

    def _check_root(self) -> None:
        if not Path(self.root).is_dir():
            raise ValueError(
                f"image folder {self.root!r} does not exist; put the training images there "
                "(one subfolder per class for class_conditional; data/prepare_ffhq.py makes FFHQ's) "
                "or fix data.init_args.root"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = Path(self.root)
        self._check_root()
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"image folder {self.root!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        labels = None
        if self.class_conditional:
            self.classes = sorted(
                {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
            )
            if not self.classes:
                raise ValueError(
                    f"class_conditional needs one subfolder per class under {self.root!r}"
                )
            index = {c: i for i, c in enumerate(self.classes)}
            files = [p for p in files if len(p.relative_to(root).parts) > 1]
            labels = [index[p.relative_to(root).parts[0]] for p in files]
        transform = ImageTransform(self.image_size, self.channels, self.random_flip)
        self._split(_Files(files, labels, transform))


class _HFImages(ImageSource):
    def __init__(
        self, ds, image_key: str, label_key: str | None, transform: ImageTransform, name: str
    ) -> None:
        self.ds, self.image_key, self.label_key, self.transform, self.name = (
            ds,
            image_key,
            label_key,
            transform,
            name,
        )

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int):
        row = self.ds[i]
        x = self.transform(row[self.image_key])
        return (x, int(row[self.label_key])) if self.label_key else (x, -1)

    def describe(self, i: int) -> str:
        return f"{self.name} row {i}"


def _prepare_script(name: str) -> str:
    """The data/prepare_*.py script that writes a dataset folder like ``name``."""
    lowered = os.path.basename(os.path.normpath(name)).lower()
    for key, script in (
        ("cifar", "data/prepare_cifar10.py"),
        ("imagenet", "data/prepare_imagenet.py"),
    ):
        if key in lowered:
            return script
    return "data/prepare_cifar10.py or data/prepare_imagenet.py (whichever dataset it is)"


class HFDataModule(DataModuleBase):
    """A Hugging Face ``datasets`` image dataset saved with ``save_to_disk`` (e.g. CIFAR-10 from
    ``uoft-cs/cifar10``, ImageNet-1k, LSUN Church). With ``allow_download`` a hub name is loaded
    through ``datasets.load_dataset`` (from its cache, or downloaded where there is internet)."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        image_key: str = "img",
        label_key: str | None = None,
        image_size: int = 32,
        channels: int = 3,
        random_flip: bool = True,
        batch_size: int = 128,
        num_workers: int = 4,
        val_fraction: float = 0.0,
        seed: int = 0,
        allow_download: bool = False,
        skip_bad_images: bool = False,
        max_bad_fraction: float = 0.01,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(
            batch_size,
            num_workers,
            val_fraction,
            seed,
            skip_bad_images,
            max_bad_fraction,
            shuffle_seed,
        )
        self.allow_download = allow_download
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.image_size, self.channels, self.random_flip = image_size, channels, random_flip
        self._check_source()

    def _check_source(self) -> None:
        if not os.path.isdir(self.name) and not self.allow_download:
            raise ValueError(
                f"dataset folder {self.name!r} does not exist; make it with {_prepare_script(self.name)} "
                "from a local copy (see data/README.md), or set data.init_args.allow_download: true to "
                "use the Hugging Face hub"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        import datasets

        self._check_source()
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
            raise ValueError(
                f"dataset {self.name!r} has no column {self.image_key!r}; columns: {ds.column_names}"
            )
        transform = ImageTransform(self.image_size, self.channels, self.random_flip)
        self._split(_HFImages(ds, self.image_key, self.label_key, transform, self.name))


class LMDBImages(ImageSource):
    """The encoded images of one LMDB database (LSUN's format: key -> WEBP/JPEG bytes), label -1.

    Reads the keys once (no cache file: torchvision's LSUN pickles one into the working
    directory and unpickles whatever it finds there); the environment opens lazily, read-only
    and without locks, in each DataLoader worker.
    """

    def __init__(self, path: str | os.PathLike, transform: ImageTransform) -> None:
        import lmdb

        self.path, self.transform, self._env = str(path), transform, None
        env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
        with env.begin(write=False) as txn:
            self.keys = list(txn.cursor().iternext(keys=True, values=False))
        env.close()
        if not self.keys:
            raise ValueError(
                f"LMDB database {self.path} holds no images; re-run data/prepare_lsun.py"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int):
        import io

        import lmdb
        from PIL import Image

        if self._env is None:
            self._env = lmdb.open(
                self.path, readonly=True, lock=False, readahead=False, meminit=False
            )
        with self._env.begin(write=False) as txn:
            data = txn.get(self.keys[i])
        if data is None:
            raise OSError("the key holds no data")
        return self.transform(Image.open(io.BytesIO(data))), -1

    def describe(self, i: int) -> str:
        return f"{self.path} key {self.keys[i].decode(errors='replace')}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None}  # workers open their own environment


class LSUNDataModule(DataModuleBase):
    """LSUN scenes from their LMDB folders (needs ``pip install lmdb``)."""

    def __init__(
        self,
        root: str,
        classes: str = "church_outdoor_train",
        image_size: int = 256,
        random_flip: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        seed: int = 0,
        skip_bad_images: bool = False,
        max_bad_fraction: float = 0.01,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(
            batch_size, num_workers, 0.0, seed, skip_bad_images, max_bad_fraction, shuffle_seed
        )
        self.root, self.classes, self.image_size, self.random_flip = (
            root,
            classes,
            image_size,
            random_flip,
        )
        self._check_lmdb()

    def _check_lmdb(self) -> Path:
        lmdb_dir = Path(self.root) / f"{self.classes}_lmdb"
        if not lmdb_dir.is_dir():
            raise ValueError(
                f"LSUN LMDB folder {lmdb_dir} is missing; download {self.classes}_lmdb.zip with the "
                f"LSUN download script and run data/prepare_lsun.py --source ZIP --out {self.root}"
            )
        return lmdb_dir

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        lmdb_dir = self._check_lmdb()
        self._split(LMDBImages(lmdb_dir, ImageTransform(self.image_size, 3, self.random_flip)))
