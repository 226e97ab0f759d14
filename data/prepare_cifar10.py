"""Prepare CIFAR-10 for configs/cifar10_p*.yaml: a Hugging Face dataset saved under data/cifar10.

    python data/prepare_cifar10.py --source cifar-10-python.tar.gz --out data/cifar10

--source may be
  - the official archive cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html),
    or the cifar-10-batches-py folder it unpacks to (its checksums are verified);
  - a copy of the Hugging Face dataset uoft-cs/cifar10: a folder written by save_to_disk,
    or the folder of its parquet files.
Writes a DatasetDict with the splits found ("train", and "test" when present), columns
``img`` (Image) and ``label`` (ClassLabel), read by pdm.data.HFDataModule(name="data/cifar10").
"""

from __future__ import annotations

import sys
import tarfile
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PrepareError, dataset_from_rows, finish, fresh_output, parser, progress, run  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
EXPECTED = {"train": 50_000, "test": 10_000}


def from_official(source: Path, workdir: Path) -> dict:
    """{split: (uint8 NHWC images, labels)} from the official python archive or folder."""
    from torchvision.datasets import CIFAR10

    if source.is_file():
        if not tarfile.is_tarfile(source):
            raise PrepareError(
                f"{source} is not a tar archive; pass cifar-10-python.tar.gz or its unpacked folder"
            )
        with tarfile.open(source) as tar:
            tar.extractall(workdir, filter="data")
        root = workdir
    else:
        root = source.parent if source.name == "cifar-10-batches-py" else source
    out = {}
    for split in ("train", "test"):
        try:
            ds = CIFAR10(str(root), train=split == "train", download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise PrepareError(
                f"no valid CIFAR-10 batches under {root} ({e}); pass the official "
                "cifar-10-python.tar.gz or its cifar-10-batches-py folder"
            ) from None
        out[split] = (ds.data, list(ds.targets))
    return out


def from_hugging_face(source: Path):
    """The DatasetDict of a save_to_disk folder or a folder of parquet files."""
    import datasets

    if (source / "dataset_dict.json").exists() or (source / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(source))
        return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})
    files = sorted(source.rglob("*.parquet"))
    if not files:
        raise PrepareError(f"{source} holds neither a saved Hugging Face dataset nor parquet files")
    splits = {s: [str(f) for f in files if f.name.startswith(s)] for s in ("train", "test")}
    return datasets.load_dataset("parquet", data_files={k: v for k, v in splits.items() if v})


def build(arrays: dict, limit: int | None, workdir: Path):
    """A DatasetDict of PNG-encoded images and class labels, with progress."""
    import datasets

    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}
    )

    def rows(images, labels):
        n = len(images) if limit is None else min(limit, len(images))
        for i in progress(range(n), n, "cifar10"):
            yield {"img": images[i], "label": int(labels[i])}

    return datasets.DatasetDict(
        {
            split: dataset_from_rows(partial(rows, im, lb), features, workdir)
            for split, (im, lb) in arrays.items()
        }
    )


def validate(ds, limit: int | None) -> None:
    """Check the splits, columns, image size and labels the config relies on."""
    if "train" not in ds:
        raise PrepareError("no train split found")
    for split, d in ds.items():
        if "img" not in d.column_names or "label" not in d.column_names:
            raise PrepareError(
                f"split {split} has columns {d.column_names}; expected img and label"
            )
        if limit is None and len(d) != EXPECTED.get(split, len(d)):
            raise PrepareError(
                f"split {split} has {len(d)} images, CIFAR-10 has {EXPECTED[split]}; is the copy complete?"
            )
        first = d[0]["img"]
        if first.size != (32, 32):
            raise PrepareError(f"split {split} holds {first.size} images, not 32x32")
        labels = set(d["label"])
        if not labels <= set(range(10)):
            raise PrepareError(
                f"split {split} has labels outside 0..9: {sorted(labels - set(range(10)))[:5]}"
            )


def main() -> None:
    args = parser(__doc__, "data/cifar10").parse_args()
    source, out = Path(args.source), Path(args.out)
    if not source.exists():
        raise PrepareError(
            f"--source {source} does not exist; download cifar-10-python.tar.gz (or the Hugging Face "
            "dataset uoft-cs/cifar10) on a machine with internet and point --source at it"
        )
    tmp = fresh_output(out, args.overwrite)
    with tempfile.TemporaryDirectory() as work:
        is_official = (
            source.is_file()
            or (source / "data_batch_1").exists()
            or (source / "cifar-10-batches-py").exists()
        )
        if is_official:
            ds = build(from_official(source, Path(work)), args.limit, Path(work))
        else:
            ds = from_hugging_face(source)
            if args.limit:
                ds = ds.__class__(
                    {k: v.select(range(min(args.limit, len(v)))) for k, v in ds.items()}
                )
        validate(ds, args.limit)
        ds.save_to_disk(str(tmp))
    finish(tmp, out)
    print(f"wrote {out}: " + ", ".join(f"{k} {len(v)}" for k, v in ds.items()))


if __name__ == "__main__":
    run(main)
