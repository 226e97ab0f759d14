"""A real full disk: a small tmpfs fills up during a training checkpoint, a sampling shard, a merge,
an export and a calibration. Each stops with one line naming the folder and its free space (exit
2), leaves the previous files intact and loadable, and completes once space is freed.

Mounting needs root (as on the project's machines and in CI); elsewhere these tests are skipped.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import sample as sample_cli
from pdm.checkpoints import load_checkpoint
from pdm.outputs import shard_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Disk:
    """A tmpfs of ``size`` bytes; ``fill(leave)`` leaves ``leave`` bytes free, ``free_up()`` undoes it."""

    def __init__(self, path, size: int) -> None:
        self.path, self.size = path, size
        path.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:80]})")

    def fill(self, leave: int) -> None:
        free = shutil.disk_usage(self.path).free
        with open(self.path / "filler", "ab") as f:
            f.write(b"\0" * max(0, free - leave))

    def free_up(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    made = Disk(tmp_path / "disk", 8 << 20)
    yield made
    made.unmount()


def _one_line_naming(err: str, folder) -> str:
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-1500:]
    assert (
        "No space left on device" in lines[0] and str(folder) in lines[0] and "free" in lines[0]
    ), lines
    return lines[0]


def test_a_sampling_shard_fills_the_disk_and_the_run_resumes(tiny_ckpts, disk, tmp_path, capsys):
    args = [
        "--ckpt",
        tiny_ckpts["cond"],
        "--num-samples",
        "40",
        "--shard-size",
        "4",
        "--steps",
        "3",
    ]
    clean = tmp_path / "clean"
    sample_cli.main([*args, "--out", str(clean)])
    shard = (clean / "shards" / "shard_00000.npz").stat().st_size
    out = disk.path / "out"
    disk.fill(leave=4 * shard + 8192)  # room for a few shards, not for ten
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample_cli.main([*args, "--out", str(out)])
    assert e.value.code == 2
    _one_line_naming(capsys.readouterr().err, out)
    finished = [p for p in sorted((out / "shards").glob("*.npz")) if shard_state(p) == "finished"]
    assert 1 <= len(finished) < 10 and not list((out / "shards").glob("*.tmp*"))
    for p in finished:  # the finished shards are whole: their images are the clean run's
        assert (np.load(p)["images"] == np.load(clean / "shards" / p.name)["images"]).all()
    disk.free_up()
    sample_cli.main([*args, "--out", str(out)])
    assert (out / "samples.npz").read_bytes() == (clean / "samples.npz").read_bytes()


def test_a_merge_and_an_export_fill_the_disk_and_complete_when_space_is_freed(
    tiny_ckpts, disk, tmp_path, capsys
):
    from pdm.checkpoints.__main__ import main as export_main

    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        sample_cli.main(
            [
                "--ckpt",
                tiny_ckpts["cond"],
                "--num-samples",
                "16",
                "--shard-size",
                "4",
                "--steps",
                "3",
                "--num-shards",
                "2",
                "--shard-index",
                str(i),
                "--out",
                str(part),
            ]
        )
    merged = disk.path / "merged"
    disk.fill(leave=6000)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample_cli.main(["--merge", *map(str, parts), "--out", str(merged)])
    assert e.value.code == 2
    _one_line_naming(capsys.readouterr().err, merged)
    export = disk.path / "model.safetensors"
    with pytest.raises(SystemExit) as e:
        export_main([tiny_ckpts["cond"], str(export)])
    assert e.value.code == 2 and not export.exists()
    _one_line_naming(capsys.readouterr().err, disk.path)
    disk.free_up()
    stats = sample_cli.main(["--merge", *map(str, parts), "--out", str(merged)])
    assert stats["num_samples"] == 16 and len(np.load(merged / "samples.npz")["arr_0"]) == 16
    export_main([tiny_ckpts["cond"], str(export)])
    assert load_checkpoint(export)["format"] == "safetensors"


def test_a_calibration_file_on_a_full_disk_is_one_line_and_nothing(tiny_ckpts, disk, capsys):
    import calibrate as calibrate_cli

    out = disk.path / "schedule.json"
    disk.fill(leave=0)
    with pytest.raises(SystemExit) as e:
        calibrate_cli.main(
            [
                "--ckpt",
                tiny_ckpts["cond"],
                "--nfe",
                "3",
                "--steps",
                "6",
                "--num-seeds",
                "2",
                "--out",
                str(out),
            ]
        )
    assert e.value.code == 2 and not out.exists()
    _one_line_naming(capsys.readouterr().err, disk.path)


def test_a_training_checkpoint_fills_the_disk_and_the_run_resumes_once_space_is_freed(disk):
    from test_preemption import TINY

    root = disk.path / "run"

    def train(*extra):
        cmd = [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "digits.yaml"),
            *TINY[:-1],
            "--trainer.callbacks.every_n_train_steps=1",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.max_steps",
            "6",
            "--model.lr_decay",
            "none",
            *extra,
        ]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, cwd=str(disk.path.parent)
        )

    first = train("--trainer.max_steps", "1")  # how large one checkpoint is
    assert first.returncode == 0, first.stderr[-1500:]
    size = (root / "checkpoints" / "last.ckpt").stat().st_size
    shutil.rmtree(root)
    disk.fill(
        leave=int(2.5 * size)
    )  # room for step 1 (its file and last.ckpt), not for a third file
    full = train()
    assert full.returncode == 2, full.stderr[-1500:]
    _one_line_naming(full.stderr, root / "checkpoints")
    kept = sorted(os.listdir(root / "checkpoints"))
    assert "last.ckpt" in kept and not [f for f in kept if ".tmp" in f]
    step = load_checkpoint(root / "checkpoints" / "last.ckpt")["global_step"]
    assert 1 <= step < 6  # the previous save loads
    disk.free_up()
    resumed = train("--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    assert load_checkpoint(root / "checkpoints" / "last.ckpt")["global_step"] == 6
