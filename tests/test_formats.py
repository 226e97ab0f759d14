"""Formats that last: every file pdm writes carries its format version, the fixtures written by the
code of 2026-12-06 (tests/fixtures/formats/make_fixtures.py) load with today's code, and a file of a
newer format is refused in one line naming the version it needs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pdm.checkpoints import load_checkpoint, load_for_sampling, training_checkpoint
from pdm.outputs import read_identity
from pdm.sampling import ScheduleFile, sample

HERE = Path(__file__).resolve().parent / "fixtures" / "formats"


def test_a_checkpoint_of_the_fixtures_loads_resumes_and_samples():
    ckpt = training_checkpoint(str(HERE / "tiny.ckpt"))
    assert ckpt["pdm_format"] == 1 and ckpt["global_step"] == 2
    loaded = load_for_sampling([str(HERE / "tiny.ckpt")])
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = {"y": torch.tensor([3, 4])}
    x = sample(
        loaded.model_fn,
        noise,
        loaded.schedule,
        prediction=loaded.prediction,
        model_kwargs=y,
        steps=3,
    ).x
    exported = load_for_sampling([str(HERE / "tiny.safetensors")])
    same = sample(
        exported.model_fn,
        noise,
        exported.schedule,
        prediction=exported.prediction,
        model_kwargs=y,
        steps=3,
    ).x
    assert torch.equal(x, same)  # the export holds the checkpoint's EMA weights


def test_the_schedule_file_and_the_one_in_the_export_replay_alike():
    file = ScheduleFile.load(HERE / "schedule_v3.json").select(3)
    embedded = ScheduleFile.from_export(HERE / "tiny.safetensors").select(3)
    assert file.settings == embedded.settings and file.settings.corrections == (0.0, 0.1, -0.05)


def test_a_finished_sampling_folder_reads_back(tmp_path):
    identity = read_identity(HERE / "sampled")
    assert identity["num_samples"] == 2 and identity["settings"]["solver"] == "ipndm"
    from pdm.metrics.__main__ import main as metrics_main

    folder = tmp_path / "sampled"
    shutil.copytree(HERE / "sampled", folder)
    result = metrics_main(
        ["digits-fd", "--images", str(folder)]
    )  # the folder: its samples.npz, not grid.png
    assert result["num_images"] == 2 == len(np.load(folder / "samples.npz")["arr_0"])


def test_a_newer_format_is_refused_naming_the_version(tmp_path):
    ckpt = torch.load(HERE / "tiny.ckpt", weights_only=True)
    ckpt["pdm_format"] = 9
    torch.save(ckpt, tmp_path / "newer.ckpt")
    with pytest.raises(
        ValueError, match=r"written by a newer pdm \(checkpoint format 9; this pdm reads up to 1\)"
    ):
        load_checkpoint(tmp_path / "newer.ckpt")
    folder = tmp_path / "sampled"
    shutil.copytree(HERE / "sampled", folder)
    manifest = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**manifest, "format": 9}))
    with pytest.raises(ValueError, match=r"newer pdm \(run format 9"):
        read_identity(folder)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(HERE / "tiny.safetensors"), framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(
        load_file(str(HERE / "tiny.safetensors")),
        str(tmp_path / "newer.safetensors"),
        metadata={**metadata, "format": "pdm-ema-v9"},
    )
    with pytest.raises(ValueError, match=r"newer pdm \(export format 9"):
        load_checkpoint(tmp_path / "newer.safetensors")
