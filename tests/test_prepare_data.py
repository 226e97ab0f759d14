"""data/prepare_*.py on tiny fixtures made here: each writes the layout its config reads, and the
matching data module loads it; bad sources stop with one line and exit code 2."""

import io
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from conftest import ROOT  # noqa: E402
from PIL import Image


def prepare(name, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "data", f"prepare_{name}.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def _png(color, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8))


def test_cifar10_from_the_official_archive_loads_in_the_hf_datamodule(tmp_path):
    # the official layout: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, pickled dicts
    # (torchvision verifies the archive's checksums, so this fixture goes through the Hugging Face route
    # below and the checksum check is exercised as a failure here)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(
                {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]},
                f,
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"x"] * 10}, f)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    res = prepare(
        "cifar10", "--source", tmp_path / "cifar-10-python.tar.gz", "--out", tmp_path / "out"
    )
    assert res.returncode == 2 and "corrupted" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_cifar10_from_a_hugging_face_copy(tmp_path):
    datasets = pytest.importorskip("datasets")
    from pdm.data import HFDataModule

    imgs = [Image.fromarray(np.full((32, 32, 3), v, dtype=np.uint8)) for v in range(0, 250, 50)]
    ds = datasets.Dataset.from_dict({"img": imgs, "label": [0, 1, 2, 3, 4]}).cast_column(
        "img", datasets.Image()
    )
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "hf"))
    res = prepare(
        "cifar10",
        "--source",
        tmp_path / "hf",
        "--out",
        tmp_path / "data" / "cifar10",
        "--limit",
        "5",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    dm = HFDataModule(
        str(tmp_path / "data" / "cifar10"),
        image_key="img",
        label_key="label",
        image_size=32,
        batch_size=5,
        num_workers=0,
        random_flip=False,
    )
    dm.setup("fit")
    x, y = dm.train_set[3]
    assert x.shape == (3, 32, 32) and y == 3
    again = prepare(
        "cifar10",
        "--source",
        tmp_path / "hf",
        "--out",
        tmp_path / "data" / "cifar10",
        "--limit",
        "5",
    )
    assert (
        again.returncode == 2 and "--overwrite" in again.stderr
    )  # never replaces a dataset silently


def test_imagenet_from_synset_folders(tmp_path):
    from pdm.data import HFDataModule

    for i, synset in enumerate(["n02", "n01"]):
        (tmp_path / "train" / synset).mkdir(parents=True)
        for j in range(3):
            _png(40 * i + 10 * j).save(
                tmp_path / "train" / synset / f"{synset}_{j}.JPEG", format="JPEG"
            )
    res = prepare(
        "imagenet", "--source", tmp_path / "train", "--out", tmp_path / "imagenet", "--limit", "6"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    dm = HFDataModule(
        str(tmp_path / "imagenet"),
        image_key="image",
        label_key="label",
        image_size=16,
        batch_size=6,
        num_workers=0,
        random_flip=False,
    )
    dm.setup("fit")
    labels = sorted(dm.train_set[i][1] for i in range(6))
    assert labels == [0, 0, 0, 1, 1, 1]  # sorted synsets: n01 -> 0, n02 -> 1
    (tmp_path / "train" / "n01" / "n01_9.JPEG").write_text("broken")
    res = prepare(
        "imagenet", "--source", tmp_path / "train", "--out", tmp_path / "imagenet2", "--limit", "7"
    )
    assert (
        res.returncode == 2
        and "cannot read" in res.stderr
        and not (tmp_path / "imagenet2").exists()
    )


def test_lsun_lmdb_zip_lands_where_the_datamodule_reads(tmp_path, monkeypatch):
    lmdb = pytest.importorskip("lmdb")
    monkeypatch.chdir(tmp_path)  # to see that nothing is written to the working directory
    from pdm.data import LSUNDataModule

    src = tmp_path / "church_outdoor_train_lmdb"
    env = lmdb.open(str(src), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(4):
            buf = io.BytesIO()
            _png(50 * i, (48, 40)).save(buf, format="WEBP")
            txn.put(f"{i:04d}".encode(), buf.getvalue())
    env.close()
    with zipfile.ZipFile(tmp_path / "church_outdoor_train_lmdb.zip", "w") as z:
        for f in src.iterdir():
            z.write(f, f"church_outdoor_train_lmdb/{f.name}")
    res = prepare(
        "lsun", "--source", tmp_path / "church_outdoor_train_lmdb.zip", "--out", tmp_path / "lsun"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    dm = LSUNDataModule(str(tmp_path / "lsun"), image_size=16, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 4 and dm.train_set[0][0].shape == (3, 16, 16)
    # every stored image comes back once, with its own (flat) colour in [-1, 1]
    levels = sorted(
        round(float(x.mean() + 1) * 127.5) for x, _ in (dm.train_set[i] for i in range(4))
    )
    assert all(abs(a - b) <= 2 for a, b in zip(levels, [0, 50, 100, 150]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "church_outdoor_train_lmdb",
        "church_outdoor_train_lmdb.zip",
        "lsun",
    ]
    empty = tmp_path / "empty" / "church_outdoor_train_lmdb"
    empty.mkdir(parents=True)
    lmdb.open(str(empty), map_size=1 << 20).close()
    with pytest.raises(ValueError, match="holds no images"):
        LSUNDataModule(str(tmp_path / "empty"), image_size=16, batch_size=2, num_workers=0).setup(
            "fit"
        )


def test_ffhq_folder_is_checked_and_copied_flat(tmp_path):
    from pdm.data import ImageFolderDataModule

    (tmp_path / "src" / "00000").mkdir(parents=True)
    for i in range(3):
        _png(60 * i, (64, 64)).save(tmp_path / "src" / "00000" / f"{i:05d}.png")
    res = prepare("ffhq", "--source", tmp_path / "src", "--out", tmp_path / "ffhq", "--size", "64")
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "ffhq").iterdir())) == 3
    dm = ImageFolderDataModule(str(tmp_path / "ffhq"), image_size=32, batch_size=3, num_workers=0)
    dm.setup("fit")
    assert dm.train_set[0][0].shape == (3, 32, 32)
    small = prepare(
        "ffhq", "--source", tmp_path / "src", "--out", tmp_path / "ffhq2", "--size", "1024"
    )
    errors = [line for line in small.stderr.splitlines() if "error:" in line]
    assert small.returncode == 2 and len(errors) == 1 and "smaller than --size" in errors[0]
    assert "Traceback" not in small.stderr


@pytest.mark.parametrize("name", ["cifar10", "imagenet", "lsun", "ffhq"])
def test_missing_source_is_one_line_naming_what_to_download(tmp_path, name):
    res = prepare(name, "--source", tmp_path / "nothing_here", "--out", tmp_path / "out")
    assert (
        res.returncode == 2
        and len(res.stderr.strip().splitlines()) == 1
        and "Traceback" not in res.stderr
    )
