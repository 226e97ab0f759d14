"""Prepare ImageNet-1k for configs/imagenet256_*.yaml: a Hugging Face dataset under data/imagenet-1k.

    python data/prepare_imagenet.py --source /datasets/ILSVRC2012/train --out data/imagenet-1k

--source may be
  - the ILSVRC2012 training folder, one subfolder per synset (n01440764/, ...): labels are the
    synsets' indices in sorted order, the standard 0..999 of torchvision and Hugging Face;
  - a copy of the Hugging Face dataset ILSVRC/imagenet-1k: a folder written by save_to_disk,
    or the folder of its parquet files.
Images are stored as their original file bytes (no re-encoding) after a check that each one
opens. Writes DatasetDict({"train": ...}) with columns ``image`` and ``label``, read by
pdm.data.HFDataModule(name="data/imagenet-1k").
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PrepareError, dataset_from_rows, finish, fresh_output, parser, progress, run  # noqa: E402

SUFFIXES = {".jpeg", ".jpg", ".png"}


def synset_folder(source: Path, limit: int | None, skip_unreadable: bool, workdir: Path):
    """A Dataset from a folder of synset subfolders, with the original bytes of each image."""
    import datasets
    from PIL import Image, UnidentifiedImageError

    synsets = sorted(p.name for p in source.iterdir() if p.is_dir())
    if not synsets:
        raise PrepareError(
            f"{source} has no class subfolders; pass ILSVRC2012's train folder (n01440764/, ...)"
        )
    files = [
        (f, i)
        for i, s in enumerate(synsets)
        for f in sorted((source / s).iterdir())
        if f.suffix.lower() in SUFFIXES
    ]
    if limit is not None:
        files = files[:limit]
    if not files:
        raise PrepareError(f"no images under {source}")
    bad: list[str] = []

    def rows():
        for path, label in progress(files, len(files), "imagenet"):
            try:
                with Image.open(path) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError):
                bad.append(str(path))
                if not skip_unreadable:
                    raise PrepareError(
                        f"cannot read {path}; delete it or pass --skip-unreadable"
                    ) from None
                continue
            yield {"image": {"bytes": path.read_bytes(), "path": path.name}, "label": label}

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=synsets)}
    )
    ds = dataset_from_rows(rows, features, workdir)
    if bad:
        print(f"skipped {len(bad)} unreadable images, e.g. {bad[0]}", file=sys.stderr)
    return datasets.DatasetDict({"train": ds}), len(synsets)


def hugging_face_copy(source: Path, limit: int | None):
    """The train split of a save_to_disk folder or a folder of parquet files."""
    import datasets

    if (source / "dataset_dict.json").exists() or (source / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(source))
        train = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        files = sorted(str(f) for f in source.rglob("*.parquet") if "train" in f.name)
        if not files:
            raise PrepareError(
                f"{source} holds neither a saved Hugging Face dataset nor train parquet files"
            )
        train = datasets.load_dataset("parquet", data_files={"train": files})["train"]
    if limit is not None:
        train = train.select(range(min(limit, len(train))))
    classes = (
        train.features["label"].num_classes
        if hasattr(train.features.get("label"), "num_classes")
        else None
    )
    return datasets.DatasetDict({"train": train}), classes


def main() -> None:
    p = parser(__doc__, "data/imagenet-1k")
    p.add_argument(
        "--skip-unreadable", action="store_true", help="leave out images that do not open"
    )
    args = p.parse_args()
    source, out = Path(args.source), Path(args.out)
    if not source.is_dir():
        raise PrepareError(
            f"--source {source} is not a folder; pass ILSVRC2012's train folder or a Hugging Face copy"
        )
    tmp = fresh_output(out, args.overwrite)
    saved = (source / "dataset_dict.json").exists() or (source / "dataset_info.json").exists()
    with tempfile.TemporaryDirectory() as work:
        if saved or any(source.rglob("*.parquet")):
            ds, classes = hugging_face_copy(source, args.limit)
        else:
            ds, classes = synset_folder(source, args.limit, args.skip_unreadable, Path(work))
        _save(ds, classes, args.limit, tmp)
    finish(tmp, out)
    print(f"wrote {out}: train {len(ds['train'])} images, {classes} classes")


def _save(ds, classes: int | None, limit: int | None, tmp: Path) -> None:
    """Check the columns and class count the config relies on, then write the dataset."""
    train = ds["train"]
    if "image" not in train.column_names or "label" not in train.column_names:
        raise PrepareError(
            f"the train split has columns {train.column_names}; expected image and label"
        )
    if limit is None and classes != 1000:
        raise PrepareError(f"found {classes} classes, ImageNet-1k has 1000; is the copy complete?")
    ds.save_to_disk(str(tmp))


if __name__ == "__main__":
    run(main)
