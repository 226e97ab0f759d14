"""The README path end to end: train.py (LightningCLI) -> checkpoint -> resume -> sample.py."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from conftest import ROOT, SMALL_NET_ARGS  # noqa: E402

SMALL = [
    *SMALL_NET_ARGS,
    "--data.init_args.batch_size",
    "16",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.check_val_every_n_epoch",
    "1",
]


def test_train_resume_and_sample_through_the_clis(tmp_path):
    root = str(tmp_path / "run")
    cfg = os.path.join(ROOT, "configs", "digits.yaml")

    def train(max_steps, *extra):
        cmd = [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "fit",
            "--config",
            cfg,
            *SMALL,
            "--trainer.max_steps",
            str(max_steps),
            "--trainer.default_root_dir",
            root,
            "--trainer.callbacks.num_samples=100",  # the config's last callback: the end-of-run digits FD
            "--trainer.enable_progress_bar",
            "false",
            "--model.lr_decay",
            "none",  # a cosine decay made for 4 steps is not stretched to 6 (refused)
            *extra,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]

    train(4)
    last = os.path.join(root, "checkpoints", "last.ckpt")
    fd = json.loads(
        open(os.path.join(root, "lightning_logs", "version_0", "digits_fd.json")).read()
    )
    assert (
        fd["num_samples"] == 100 and fd["fd8x8"] > fd["real_vs_real_fd8x8"] > 0
    )  # 4 steps: far from the data
    assert torch.load(last, weights_only=True)["global_step"] == 4
    train(6, "--ckpt_path", last)
    assert torch.load(last, weights_only=True)["global_step"] == 6

    out = tmp_path / "samples"
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "sample.py"),
            "--ckpt",
            last,
            "--num-samples",
            "4",
            "--steps",
            "20",
            "--solver",
            "dpmsolver++",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    arr = np.load(out / "samples.npz")
    assert arr["arr_0"].shape == (4, 32, 32, 1) and arr["arr_1"].shape == (4,)
    assert json.loads((out / "stats.json").read_text())["nfe"] == 20
    assert (out / "grid.png").exists()


def test_the_smoke_overlay_runs_any_config_quickly_and_leaves_nothing_behind(tmp_path):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "digits.yaml"),
        "--config",
        os.path.join(ROOT, "configs", "overlays", "smoke.yaml"),
        *SMALL_NET_ARGS,
        "--trainer.max_steps",
        "3",
        "--trainer.enable_progress_bar",
        "false",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # repeatable: it writes no checkpoints, so there is no run folder for the next smoke run to collide with
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))
    assert "digits FD-8x8" not in res.stdout
