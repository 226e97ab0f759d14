"""Where reference images come from: what ``sample.py`` and the ``data/prepare_*.py`` scripts
write, read in batches of uint8 NHWC arrays (a training set need not fit in memory).

- a ``samples.npz`` (arr_0) or a folder of image files (FFHQ's ``data/ffhq``);
- a Hugging Face dataset saved with ``save_to_disk`` (``data/cifar10``, ``data/imagenet-1k``);
- an LMDB database of encoded images (``data/lsun/church_outdoor_train_lmdb``).

With ``image_size`` every image gets the training transform's centre crop
(:func:`pdm.data.transforms.adm_center_crop`, without the random flip), so the statistics
describe the images the model was trained on; without it the images must share one size.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def reference_batches(
    spec: str,
    image_size: int | None = None,
    split: str = "train",
    limit: int | None = None,
    batch_size: int = 250,
) -> tuple[int, Iterator[np.ndarray]]:
    """(number of images, iterator over uint8 NHWC batches) of ``spec``; a ValueError names
    what is wrong with it before any image is read."""
    path = Path(spec)
    if _is_hf_dataset(path):
        count, encoded = _hf_images(path, split)
    elif (path / "data.mdb").is_file():
        count, encoded = _lmdb_images(path)
    else:
        from pdm.metrics.fid import load_images

        images = load_images(path, 1)
        if image_size is None:
            count = min(len(images), limit or len(images))
            return count, (images[i : i + batch_size] for i in range(0, count, batch_size))
        count, encoded = len(images), (images[i] for i in range(len(images)))
    count = min(count, limit or count)
    return count, _batched(_decoded(encoded, image_size, spec), count, batch_size)


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json")
    )


def _hf_images(path: Path, split: str) -> tuple[int, Iterable]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(
                f"{path} has no split {split!r} (splits: {', '.join(ds)}); pass --split"
            )
        ds = ds[split]
    columns = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not columns:
        raise ValueError(f"{path} has no image column (columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns(columns[:1])
    return len(ds), (row[columns[0]] for row in ds)


def _lmdb_images(path: Path) -> tuple[int, Iterable]:
    try:
        import lmdb
    except ImportError:
        raise ValueError(f"{path} is an LMDB database; pip install lmdb to read it") from None
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
    count = env.stat()["entries"]

    def values():
        with env.begin(write=False) as txn:
            for _, data in txn.cursor():
                yield bytes(data)
        env.close()

    return count, values()


def _decoded(items: Iterable, image_size: int | None, spec: str) -> Iterator[np.ndarray]:
    """uint8 HWC RGB arrays from PIL images, encoded bytes or arrays, cropped to ``image_size``."""
    from PIL import Image

    from pdm.data.transforms import adm_center_crop

    first = None
    for k, item in enumerate(items):
        if isinstance(item, (bytes, bytearray)):
            try:
                item = Image.open(io.BytesIO(item))
            except OSError:
                raise ValueError(f"{spec}: image {k} cannot be decoded") from None
        elif isinstance(item, np.ndarray):
            item = Image.fromarray(item.squeeze(-1) if item.shape[-1] == 1 else item)
        image = item.convert("RGB")
        array = np.asarray(image if image_size is None else adm_center_crop(image, image_size))
        first = array.shape if first is None else first
        if array.shape != first:
            raise ValueError(
                f"{spec}: images differ in size ({first[:2]} and {array.shape[:2]}); pass --image-size "
                "N (the config's image_size) to centre-crop them as training does"
            )
        yield array


def _batched(arrays: Iterator[np.ndarray], count: int, batch_size: int) -> Iterator[np.ndarray]:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=count,
        desc="reference images",
        unit="img",
        file=sys.stderr,
        disable=count < 2 * batch_size,
    )
    batch = []
    for array in arrays:
        batch.append(array)
        if len(batch) == batch_size or bar.n + len(batch) == count:
            bar.update(len(batch))
            yield np.stack(batch)
            batch = []
            if bar.n >= count:
                break
    bar.close()
