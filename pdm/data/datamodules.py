"""LightningDataModules: embedded digits, image folders, Hugging Face datasets and LSUN LMDB."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset, random_split
from torchdata.stateful_dataloader import StatefulDataLoader

from pdm.data.decoding import ImageSource
from pdm.data.transforms import ImageTransform

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class EpochShuffle(DistributedSampler):
    """The training order: a shuffle that is a function of (seed, epoch) alone, this process's
    share of it under DDP (every ``world_size``-th index), the whole of it otherwise.

    It is a DistributedSampler, so Lightning keeps it under DDP and sets its epoch; its epoch
    is also restored from the data module's checkpoint state before the first batch, because
    Lightning builds the resumed iterator before it sets the epoch.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, epoch: int = 0) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(dataset, num_replicas=None if distributed else 1, rank=None if distributed else 0,
                         shuffle=True, seed=seed, drop_last=True)
        self.set_epoch(epoch)


class _Loader(StatefulDataLoader):
    """StatefulDataLoader that can be told to start its epoch afresh whatever state it is given."""

    def __init__(self, *args, ignore_saved_position: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ignore_saved_position = ignore_saved_position

    def load_state_dict(self, state_dict: dict) -> None:
        if not self.ignore_saved_position:
            super().load_state_dict(state_dict)


class _Base(L.LightningDataModule):
    """Shared loader settings: batch size, workers, a seeded train/val split.

    The training loader is torchdata's ``StatefulDataLoader`` over an :class:`EpochShuffle`:
    how many batches of the epoch were served goes into every checkpoint, so a run resumed
    mid-epoch sees exactly the batches the uninterrupted run would have seen, in a single
    process and under DDP (where Lightning puts its distributed sampler, also a function of
    (seed, epoch), in its place and the loader fast-forwards through the served batches).
    """

    def __init__(self, batch_size: int, num_workers: int, val_fraction: float, seed: int,
                 skip_bad_images: bool = False, max_bad_fraction: float = 0.01) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.skip_bad_images, self.max_bad_fraction = skip_bad_images, max_bad_fraction
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}; 0 trains on everything")
        self.batch_size, self.num_workers, self.val_fraction, self.seed = batch_size, num_workers, val_fraction, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._restored: dict | None = None

    def _split(self, full: Dataset) -> None:
        if isinstance(full, ImageSource):
            full.set_bad_image_policy(self.skip_bad_images, self.max_bad_fraction)
        n_val = int(len(full) * self.val_fraction)
        if len(full) - n_val < self.batch_size:
            raise ValueError(f"{len(full) - n_val} training images are fewer than one batch of {self.batch_size}; "
                             "lower data.batch_size or data.val_fraction")
        if n_val == 0:
            self.train_set, self.val_set = full, None
            return
        g = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set = random_split(full, [len(full) - n_val, n_val], generator=g)

    def train_dataloader(self) -> StatefulDataLoader:
        restored = self._restored or {}
        finished = bool(restored.get("epoch_finished"))  # saved on the last batch: start the next epoch afresh
        return _Loader(self.train_set, batch_size=self.batch_size, drop_last=True, ignore_saved_position=finished,
                       sampler=EpochShuffle(self.train_set, self.seed, restored.get("epoch", 0) + finished),
                       num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def state_dict(self) -> dict:
        """The epoch training is in and whether it was finished (the loader's own state holds
        the position inside it)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "epoch_finished": done >= trainer.num_training_batches}

    def load_state_dict(self, state_dict: dict) -> None:
        """Remember the epoch to resume in (applied when the train loader is built)."""
        self._restored = dict(state_dict or {})

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


class _Files(ImageSource):
    def __init__(self, files: list[Path], labels: list[int] | None, transform: ImageTransform) -> None:
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


class ImageFolderDataModule(_Base):
    """Images under ``root``; with ``class_conditional`` each subfolder is a class (sorted names).
    An unreadable image stops the run unless ``skip_bad_images`` (see :mod:`pdm.data.decoding`)."""

    def __init__(self, root: str, image_size: int = 256, channels: int = 3, class_conditional: bool = False,
                 random_flip: bool = True, batch_size: int = 64, num_workers: int = 4, val_fraction: float = 0.0,
                 seed: int = 0, skip_bad_images: bool = False, max_bad_fraction: float = 0.01) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed, skip_bad_images, max_bad_fraction)
        self.root, self.image_size, self.channels = root, image_size, channels
        self.class_conditional, self.random_flip = class_conditional, random_flip
        self.classes: list[str] = []
        self._check_root()

    def _check_root(self) -> None:
        if not Path(self.root).is_dir():
            raise ValueError(f"image folder {self.root!r} does not exist; put the training images there "
                             "(one subfolder per class for class_conditional; data/prepare_ffhq.py makes FFHQ's) "
                             "or fix data.init_args.root")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = Path(self.root)
        self._check_root()
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
        self._split(_Files(files, labels, transform))


class _HFImages(ImageSource):
    def __init__(self, ds, image_key: str, label_key: str | None, transform: ImageTransform, name: str) -> None:
        self.ds, self.image_key, self.label_key, self.transform, self.name = ds, image_key, label_key, transform, name

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
    for key, script in (("cifar", "data/prepare_cifar10.py"), ("imagenet", "data/prepare_imagenet.py")):
        if key in lowered:
            return script
    return "data/prepare_cifar10.py or data/prepare_imagenet.py (whichever dataset it is)"


class HFDataModule(_Base):
    """A Hugging Face ``datasets`` image dataset saved with ``save_to_disk`` (e.g. CIFAR-10 from
    ``uoft-cs/cifar10``, ImageNet-1k, LSUN Church). With ``allow_download`` a hub name is loaded
    through ``datasets.load_dataset`` (from its cache, or downloaded where there is internet)."""

    def __init__(self, name: str, split: str = "train", image_key: str = "img", label_key: str | None = None,
                 image_size: int = 32, channels: int = 3, random_flip: bool = True, batch_size: int = 128,
                 num_workers: int = 4, val_fraction: float = 0.0, seed: int = 0, allow_download: bool = False,
                 skip_bad_images: bool = False, max_bad_fraction: float = 0.01) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed, skip_bad_images, max_bad_fraction)
        self.allow_download = allow_download
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.image_size, self.channels, self.random_flip = image_size, channels, random_flip
        self._check_source()

    def _check_source(self) -> None:
        if not os.path.isdir(self.name) and not self.allow_download:
            raise ValueError(f"dataset folder {self.name!r} does not exist; make it with {_prepare_script(self.name)} "
                             "from a local copy (see data/README.md), or set data.init_args.allow_download: true to "
                             "use the Hugging Face hub")

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
            raise ValueError(f"dataset {self.name!r} has no column {self.image_key!r}; columns: {ds.column_names}")
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
            raise ValueError(f"LMDB database {self.path} holds no images; re-run data/prepare_lsun.py")

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int):
        import io

        import lmdb
        from PIL import Image

        if self._env is None:
            self._env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
        with self._env.begin(write=False) as txn:
            data = txn.get(self.keys[i])
        if data is None:
            raise OSError("the key holds no data")
        return self.transform(Image.open(io.BytesIO(data))), -1

    def describe(self, i: int) -> str:
        return f"{self.path} key {self.keys[i].decode(errors='replace')}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None}  # workers open their own environment


class LSUNDataModule(_Base):
    """LSUN scenes from their LMDB folders (needs ``pip install lmdb``)."""

    def __init__(self, root: str, classes: str = "church_outdoor_train", image_size: int = 256, random_flip: bool = True,
                 batch_size: int = 64, num_workers: int = 4, seed: int = 0, skip_bad_images: bool = False,
                 max_bad_fraction: float = 0.01) -> None:
        super().__init__(batch_size, num_workers, 0.0, seed, skip_bad_images, max_bad_fraction)
        self.root, self.classes, self.image_size, self.random_flip = root, classes, image_size, random_flip
        self._check_lmdb()

    def _check_lmdb(self) -> Path:
        lmdb_dir = Path(self.root) / f"{self.classes}_lmdb"
        if not lmdb_dir.is_dir():
            raise ValueError(f"LSUN LMDB folder {lmdb_dir} is missing; download {self.classes}_lmdb.zip with the "
                             f"LSUN download script and run data/prepare_lsun.py --source ZIP --out {self.root}")
        return lmdb_dir

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        lmdb_dir = self._check_lmdb()
        self._split(LMDBImages(lmdb_dir, ImageTransform(self.image_size, 3, self.random_flip)))
