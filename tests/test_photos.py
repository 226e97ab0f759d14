"""Crops of scikit-learn's sample photographs (pdm.data.PhotoCropsDataModule): deterministic per
seed, held-out crops the same for every seed and never overlapping a training crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdm.data import PhotoCropsDataModule
from pdm.data.photos import regions, sample_photographs


def _module(**kw) -> PhotoCropsDataModule:
    args = {"num_train": 256, "num_heldout": 64, "batch_size": 16, **kw}
    data = PhotoCropsDataModule(**args)
    data.setup("fit")
    return data


def test_crops_are_deterministic_per_seed_and_the_held_out_set_is_shared():
    a, b, c = _module(seed=0), _module(seed=0), _module(seed=1)
    assert torch.equal(a.train_set.crops, b.train_set.crops)
    assert not torch.equal(a.train_set.crops, c.train_set.crops)
    assert torch.equal(a.val_set.crops, c.val_set.crops)  # every run is scored on the same crops
    x, y = a.train_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == -1
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(a.train_set.crops.float().std()) > 20  # real photographs, not a flat image
    flips = a.train_set.meta[:, 3]
    assert 0.3 < flips.mean() < 0.7  # random horizontal flips
    assert a.val_set.meta[:, 3].sum() == 0  # held-out crops are not flipped


def test_held_out_crops_never_overlap_a_training_crop():
    data = _module(num_train=2048, num_heldout=512, gap=4)
    photos = sample_photographs(2.0)
    train, held = regions(photos, 0.25, 4)
    size = data.image_size
    for region_train, region_held in zip(train, held):
        assert region_held.left - region_train.right == 4
        t = data.train_set.meta[data.train_set.meta[:, 0] == region_train.photo]
        h = data.val_set.meta[data.val_set.meta[:, 0] == region_held.photo]
        assert len(t) and len(h)
        assert (t[:, 2] + size).max() <= region_train.right  # training crops end before the gap
        assert h[:, 2].min() >= region_held.left  # held-out crops start after it
        assert (t[:, 2] + size).max() + 4 <= h[:, 2].min()
    # each crop is the photograph's pixels at its recorded place (flipped where recorded)
    for crops, meta in (
        (data.train_set.crops, data.train_set.meta),
        (data.val_set.crops, data.val_set.meta),
    ):
        for k in (0, 1, 7):
            photo, top, left, flipped = meta[k]
            patch = photos[photo][top : top + size, left : left + size]
            patch = patch[:, ::-1] if flipped else patch
            assert np.array_equal(crops[k].numpy().transpose(1, 2, 0), patch)


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="heldout_fraction"):
        PhotoCropsDataModule(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="does not fit"):
        _module(image_size=256)
    with pytest.raises(ValueError, match="downscale"):
        sample_photographs(0.5)
