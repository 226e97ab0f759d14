"""Data modules: the embedded digits, image folders (ADM crop, classes, unreadable files),
Hugging Face datasets from disk, and clear errors for missing data."""

import numpy as np
import pytest
import torch
from PIL import Image

from pdm.data import (
    DigitsDataModule,
    HFDataModule,
    ImageFolderDataModule,
    LSUNDataModule,
    load_digits_tensor,
)
from pdm.data.transforms import adm_center_crop


def test_digits_are_1797_real_images_upsampled_to_32_with_labels():
    x, y = load_digits_tensor(32)
    assert x.shape == (1797, 1, 32, 32) and y.shape == (1797,)
    assert x.min().item() == pytest.approx(-1.0) and x.max().item() == pytest.approx(1.0, abs=1e-6)
    assert sorted(set(y.tolist())) == list(range(10))
    from sklearn.datasets import load_digits

    # the same as torchvision's bilinear resize of the 8x8 originals (an independent implementation)
    from torchvision.transforms.functional import InterpolationMode, resize

    orig = torch.tensor(load_digits().images[:10], dtype=torch.float32)[:, None] / 16
    ref = resize(orig, [32, 32], interpolation=InterpolationMode.BILINEAR, antialias=False) * 2 - 1
    assert torch.allclose(x[:10], ref, atol=1e-5)


def test_digits_datamodule_batches():
    dm = DigitsDataModule(batch_size=32, val_fraction=0.05)
    dm.setup("fit")
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (32, 1, 32, 32) and yb.dtype == torch.long
    assert len(dm.val_set) == int(1797 * 0.05)


def test_adm_center_crop_keeps_the_centre_square():
    arr = np.zeros((300, 600, 3), dtype=np.uint8)
    arr[:, 150:450] = 255  # the centre 300x300 is white
    out = adm_center_crop(Image.fromarray(arr), 64)
    assert out.size == (64, 64)
    assert np.asarray(out).min() > 200


def _write_images(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), i * 20, dtype=np.uint8)).save(
            folder / f"{i}.png"
        )


def test_image_folder_with_classes_and_unreadable_files_skipped_when_asked(tmp_path):
    _write_images(tmp_path / "cats", 3)
    _write_images(tmp_path / "dogs", 2)
    (tmp_path / "dogs" / "broken.png").write_text("not an image")
    dm = ImageFolderDataModule(
        str(tmp_path),
        image_size=16,
        class_conditional=True,
        batch_size=2,
        num_workers=0,
        skip_bad_images=True,
        max_bad_fraction=0.2,
    )
    dm.setup("fit")
    assert dm.classes == ["cats", "dogs"]
    with pytest.warns(
        UserWarning, match="skipped unreadable image .*broken.png .*1 skipped so far"
    ):
        items = [dm.train_set[i] for i in range(len(dm.train_set))]
    assert dm.train_set.skipped == 1
    assert all(x.shape == (3, 16, 16) for x, _ in items)
    labels = [y for _, y in items]
    # 6 files; the broken one (last in sorted order) is replaced by the next readable image
    assert len(labels) == 6 and labels[:5] == [0, 0, 0, 1, 1] and labels[5] in (0, 1)


def test_unreadable_image_stops_by_default_naming_the_file(tmp_path):
    _write_images(tmp_path, 1)
    (tmp_path / "broken.png").write_text("x")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, num_workers=0, batch_size=1)
    dm.setup("fit")
    with pytest.raises(ValueError, match="cannot read image .*broken.png.*skip_bad_images: true"):
        [dm.train_set[i] for i in range(len(dm.train_set))]


def test_truncated_image_is_bad_and_too_many_bad_images_stop_a_skipping_run(tmp_path):
    _write_images(tmp_path, 8, size=(64, 64))
    whole = (tmp_path / "0.png").read_bytes()
    for name in ("1.png", "3.png", "6.png"):
        (tmp_path / name).write_bytes(whole[: len(whole) // 2])  # truncated mid-stream
    dm = ImageFolderDataModule(
        str(tmp_path),
        image_size=16,
        num_workers=0,
        batch_size=1,
        skip_bad_images=True,
        max_bad_fraction=0.25,
    )
    dm.setup("fit")
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        assert dm.train_set[1][0].shape == (3, 16, 16)  # 1.png is replaced by 2.png ...
        dm.train_set[3]  # ... 3.png by 4.png (2 of 8 unreadable: within 25%) ...
    with pytest.raises(
        ValueError, match="3 of 8 images cannot be read, more than max_bad_fraction=0.25"
    ):
        dm.train_set[6]  # ... and the third is one too many
    assert dm.train_set.skipped == 3


def test_missing_or_empty_folder_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "nope")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataModule(str(tmp_path / "empty")).setup("fit")


def test_hugging_face_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.fromarray(np.full((32, 32, 3), v, dtype=np.uint8)) for v in (0, 128, 255)]
    ds = datasets.Dataset.from_dict({"img": imgs, "label": [0, 1, 2]}).cast_column(
        "img", datasets.Image()
    )
    ds.save_to_disk(str(tmp_path / "tiny"))
    dm = HFDataModule(
        str(tmp_path / "tiny"),
        image_key="img",
        label_key="label",
        image_size=16,
        batch_size=3,
        num_workers=0,
        random_flip=False,
    )
    dm.setup("fit")
    x, y = dm.train_set[2]
    assert x.shape == (3, 16, 16) and y == 2 and x.min().item() == pytest.approx(1.0)


def test_missing_hub_dataset_and_lsun_name_what_to_download(tmp_path):
    with pytest.raises(ValueError, match="data/prepare_cifar10.py"):
        HFDataModule("data/no_such_dataset").setup("fit")  # fails at once, no hub retries
    with pytest.raises(ValueError, match="church_outdoor_train_lmdb"):
        LSUNDataModule(str(tmp_path)).setup("fit")


def test_a_bad_lsun_record_stops_naming_its_key_or_is_skipped(tmp_path):
    import io

    import lmdb

    from pdm.data.datamodules import LMDBImages
    from pdm.data.transforms import ImageTransform

    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(buf, format="WEBP")
            data = buf.getvalue()
            txn.put(
                f"img{i}".encode(), data[: len(data) // 3] if i == 2 else data
            )  # record 2 is truncated
    env.close()
    ds = LMDBImages(tmp_path / "db", ImageTransform(16, 3, False))
    assert ds[1][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="cannot read image .*db key img2.*skip_bad_images"):
        ds[2]
    ds.set_bad_image_policy(True, 0.25)
    with pytest.warns(UserWarning, match="key img2"):
        assert torch.equal(ds[2][0], ds[3][0])  # replaced by the next readable record
    assert ds.skipped == 1


def test_a_bad_hugging_face_row_stops_naming_the_row(tmp_path):
    import datasets

    good = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    ds = datasets.Dataset.from_dict({"img": [good, good, good], "label": [0, 1, 2]}).cast_column(
        "img", datasets.Image()
    )
    ds = ds.cast_column("img", datasets.Image(decode=False))
    rows = ds.to_dict()
    rows["img"][1] = {"bytes": b"not an image at all", "path": None}
    broken = datasets.Dataset.from_dict(rows).cast_column("img", datasets.Image())
    broken.save_to_disk(str(tmp_path / "hf"))
    dm = HFDataModule(
        str(tmp_path / "hf"), image_size=8, label_key="label", batch_size=1, num_workers=0
    )
    dm.setup("fit")
    assert dm.train_set[0][1] == 0
    with pytest.raises(ValueError, match=f"cannot read image {tmp_path / 'hf'} row 1"):
        dm.train_set[1]
