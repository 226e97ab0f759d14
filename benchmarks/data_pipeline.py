"""How many training images per second one data-loader worker delivers, per kind of dataset.

    python benchmarks/data_pipeline.py                     # generated data, 200 images per kind
    python benchmarks/data_pipeline.py --images 40 --kinds folder   # a quick look

A loader worker is one process with one torch thread (DataLoader's setting), so the images/s of a
single process going through a dataset is one worker's. For each kind it writes a stand-in
dataset into --root (nothing is downloaded): ImageNet-sized JPEGs in an image folder (quality
90, 300-500 pixels a side, the sizes ImageNet's training images have), LSUN-sized WebP images in
an LMDB (256 on the short side, as LSUN ships them) and 32x32 PNGs in a saved Hugging Face
dataset (CIFAR-10's format); the images are smooth synthetic scenes, not noise, so the codecs
work as hard as on photographs. Then it times the training transform (decode, ADM centre crop,
flip, to a tensor) in several ways:

- ``pdm``: the data module's own dataset item (PIL decode, then ADM's box-halving and bicubic
  resize), the reference;
- ``PIL draft``: PIL's ``draft`` first, which lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8
  scale (never below the crop's size), then the same crop;
- ``torchvision decode``: ``torchvision.io.decode_image`` (libjpeg-turbo / libwebp / libpng)
  into a tensor, then the same ADM crop;
- ``torchvision resize``: ``decode_image``, then an antialiased bicubic resize and crop on the
  tensor (not ADM's resampling).

Each row gives images/s and, against ``pdm``'s output for the same items, the mean and largest
pixel difference in 1/255 steps. Writes benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import HERE, machine, markdown_table, write_json  # noqa: E402

KINDS = {  # kind: (stored as, training image size, what it stands for)
    "folder": ("folder", 256, "ImageNet-256: JPEG folder"),
    "folder64": ("folder", 64, "ImageNet-64: the same JPEGs"),
    "lmdb": ("lmdb", 256, "LSUN 256: WebP in LMDB"),
    "hf": ("hf", 32, "CIFAR-10: PNG in a saved HF dataset"),
}


def scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth synthetic photograph-like RGB image: gradients, soft blobs, a little grain."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-1, 1, 3)
        image[..., c] = 128 + 60 * np.sin(a * xx / width * 6 + b * yy / height * 6 + d * 3)
    for _ in range(6):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.3) * min(height, width)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        image += blob[..., None] * rng.uniform(-90, 90, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_folder(folder: Path, n: int, rng: np.random.Generator) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(300, 501, 2))
        Image.fromarray(scene(rng, h, w)).save(folder / f"{i:05d}.JPEG", quality=90)
    return folder


def make_lmdb(path: Path, n: int, rng: np.random.Generator) -> Path:
    import lmdb
    from PIL import Image

    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i in range(n):
            w = int(rng.integers(256, 400))
            buf = io.BytesIO()
            Image.fromarray(scene(rng, 256, w)).save(buf, format="WEBP", quality=75)
            txn.put(f"{i:08d}".encode(), buf.getvalue())
    env.close()
    return path


def make_hf(path: Path, n: int, rng: np.random.Generator) -> Path:
    import datasets
    from PIL import Image

    images = [Image.fromarray(scene(rng, 32, 32)) for _ in range(n)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(
        {"img": images, "label": [i % 10 for i in range(n)]}, features
    ).save_to_disk(str(path))
    return path


def encoded_items(kind: str, path: Path) -> list[bytes]:
    """The encoded bytes of every image of a stand-in dataset, in the dataset's order."""
    if kind == "folder":
        return [p.read_bytes() for p in sorted(path.iterdir())]
    if kind == "lmdb":
        import lmdb

        env = lmdb.open(str(path), readonly=True, lock=False)
        with env.begin() as txn:
            items = [v for _, v in txn.cursor()]
        env.close()
        return items
    import datasets

    ds = datasets.load_from_disk(str(path)).cast_column("img", datasets.Image(decode=False))
    return [row["img"]["bytes"] for row in ds]


def pdm_dataset(kind: str, path: Path, size: int):
    """pdm's own dataset of that kind (flips off, so every way sees the same pixels)."""
    from pdm.data.datamodules import LMDBImages, _Files, _HFImages
    from pdm.data.transforms import ImageTransform

    transform = ImageTransform(size, 3, random_flip=False)
    if kind == "folder":
        return _Files(sorted(path.iterdir()), None, transform)
    if kind == "lmdb":
        return LMDBImages(path, transform)
    import datasets

    return _HFImages(datasets.load_from_disk(str(path)), "img", None, transform, str(path))


def pil_draft(data: bytes, size: int) -> torch.Tensor:
    from PIL import Image

    from pdm.data.transforms import adm_center_crop, to_model_range

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))  # JPEG only: DCT scaling, short side stays >= size
        return to_model_range(adm_center_crop(im.convert("RGB"), size))


def tv_decode(data: bytes, size: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    from pdm.data.transforms import adm_center_crop, to_model_range

    array = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
    image = Image.fromarray(array.permute(1, 2, 0).numpy())
    return to_model_range(adm_center_crop(image, size))


def tv_resize(data: bytes, size: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    array = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
    h, w = array.shape[1:]
    scale = size / min(h, w)
    array = TF.resize(
        array,
        [round(h * scale), round(w * scale)],
        interpolation=TF.InterpolationMode.BICUBIC,
        antialias=True,
    )
    array = TF.center_crop(array, [size, size])
    return array.float() / 127.5 - 1.0


WAYS = {"PIL draft": pil_draft, "torchvision decode": tv_decode, "torchvision resize": tv_resize}


def time_way(fn, n: int, repeats: int) -> tuple[float, list[torch.Tensor]]:
    """Best images/s over ``repeats`` passes of ``fn(i)`` for i < n, and the outputs."""
    best, out = 0.0, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = [fn(i) for i in range(n)]
        best = max(best, n / (time.perf_counter() - start))
    return best, out


def difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """Mean and largest absolute difference in 1/255 steps."""
    diffs = [((x - y).abs() * 127.5).flatten() for x, y in zip(a, b)]
    allv = torch.cat(diffs)
    return float(allv.mean()), float(allv.max())


def run(kind: str, root: Path, n: int, repeats: int, seed: int = 0) -> list[dict]:
    """Make the stand-in dataset of ``kind``, time every way through it, compare pixels."""
    rng = np.random.default_rng(seed)
    stored, size, _ = KINDS[kind]
    makers = {"folder": make_folder, "lmdb": make_lmdb, "hf": make_hf}
    path = root / stored
    if not path.exists():
        makers[stored](path, n, rng)
    dataset = pdm_dataset(stored, path, size)
    items = encoded_items(stored, path)
    ips, reference = time_way(lambda i: dataset[i][0], n, repeats)
    rows = [
        {"kind": kind, "way": "pdm", "images_per_second": ips, "mean_diff": 0.0, "max_diff": 0.0}
    ]
    for way, fn in WAYS.items():
        if way == "PIL draft" and stored != "folder":
            continue  # draft does something for JPEG only
        ips, out = time_way(lambda i, fn=fn: fn(items[i], size), n, repeats)
        mean, largest = difference(out, reference)
        rows.append(
            {
                "kind": kind,
                "way": way,
                "images_per_second": ips,
                "mean_diff": mean,
                "max_diff": largest,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--images", type=int, default=200, help="images per kind")
    p.add_argument("--repeats", type=int, default=2, help="timed passes (the fastest is kept)")
    p.add_argument(
        "--root",
        default=None,
        help="where to write the stand-in data (default: a temporary folder)",
    )
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for kind in args.kinds:
            rows += run(kind, root, args.images, args.repeats)
            print(f"{kind}: done", file=sys.stderr, flush=True)
    write_json(Path(args.out) / "data_pipeline.json", {"machine": machine(), "rows": rows})
    table = markdown_table(
        ["dataset", "way", "images/s per worker", "× pdm", "mean diff /255", "max diff /255"],
        [
            [
                KINDS[r["kind"]][2],
                r["way"],
                f"{r['images_per_second']:.0f}",
                f"{r['images_per_second'] / next(q['images_per_second'] for q in rows if q['kind'] == r['kind'] and q['way'] == 'pdm'):.2f}",
                f"{r['mean_diff']:.2f}",
                f"{r['max_diff']:.0f}",
            ]
            for r in rows
        ],
    )
    print(
        f"machine: {machine()}; one process, one torch thread, {args.images} images per kind\n{table}"
    )
    return rows


if __name__ == "__main__":
    main()
