"""sample.py: outputs, seed-per-image determinism, shards and resume, experts, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import sample as sample_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_writes_grid_samples_and_stats(tiny_ckpts, tmp_path):
    stats = sample_cli.main(["--ckpt", tiny_ckpts["cond"], "--num-samples", "6", "--steps", "5", "--out", str(tmp_path),
                             "--guidance-scale", "1.5", "--labels", "3", "7"])
    npz = np.load(tmp_path / "samples.npz")
    assert npz["arr_0"].shape == (6, 16, 16, 1) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [3, 7, 3, 7, 3, 7]
    assert (tmp_path / "grid.png").stat().st_size > 0
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["nfe"] == 5 and saved["images_per_second"] > 0 and saved["seconds"] > 0
    assert saved["settings"]["solver"] == "dpmsolver++" and stats["num_samples"] == 6


def test_images_do_not_depend_on_batch_size_or_shards(tiny_ckpts, tmp_path):
    common = ["--ckpt", tiny_ckpts["cond"], "--num-samples", "7", "--steps", "4"]
    sample_cli.main(common + ["--out", str(tmp_path / "a"), "--batch-size", "7"])
    sample_cli.main(common + ["--out", str(tmp_path / "b"), "--batch-size", "2", "--shard-size", "3"])
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_killed_sharded_run_resumes_to_identical_images(tiny_ckpts, tmp_path):
    args = ["--ckpt", tiny_ckpts["uncond"], "--num-samples", "24", "--steps", "8", "--batch-size", "2",
            "--shard-size", "4"]
    full = run_cli(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "shards" / "shard_00001.npz").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(os.listdir(out / "shards"))
    assert "shard_00001.npz" in done_before and not (out / "samples.npz").exists()
    resumed = run_cli(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images_sampled_this_run"] < 24  # finished shards were not redone
    assert (out / "samples.npz").read_bytes() == (tmp_path / "full" / "samples.npz").read_bytes()


def test_two_experts_sample_and_report_nfe(tiny_ckpts, tmp_path):
    stats = sample_cli.main(["--ckpt", tiny_ckpts["low"], "--ckpt", tiny_ckpts["high"], "--num-samples", "3",
                             "--steps", "6", "--out", str(tmp_path)])
    assert stats["nfe"] == 6 and np.load(tmp_path / "samples.npz")["arr_0"].shape[0] == 3


def test_adaptive_skipping_flags_report_the_evaluated_mask(tiny_ckpts, tmp_path):
    stats = sample_cli.main(["--ckpt", tiny_ckpts["uncond"], "--num-samples", "2", "--steps", "20", "--out",
                             str(tmp_path), "--skip-threshold", "1e9", "--max-skips", "2"])
    assert len(stats["evaluated"]) == 2 and len(stats["evaluated"][0]) == 20
    assert stats["nfe"] == sum(stats["evaluated"][0]) < 20


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ckpt", "does/not/exist.ckpt"], "does not exist"),
        (["--ckpt", "@uncond", "--guidance-scale", "2"], "unconditional"),
        (["--ckpt", "@cond", "--labels", "12"], "out of range"),
        (["--ckpt", "@high"], "partner"),
        (["--ckpt", "@high", "--ckpt", "@low_gap"], "do not meet"),
        (["--ckpt", "@notckpt"], "not a readable PyTorch checkpoint"),
        (["--ckpt", "@cond", "--method", "singlestep_fixed", "--order", "3", "--steps", "2"], "needs at least 3 steps"),
        (["--ckpt", "@cond", "--order", "4"], "order must be 1, 2 or 3 for dpmsolver++"),
        (["--ckpt", "@cond", "--out", "@file/sub"], "cannot write to output folder"),
    ],
)
def test_bad_input_exits_2_with_a_one_line_message(tiny_ckpts, tmp_path, extra, message):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("hello")
    paths = {**tiny_ckpts, "notckpt": str(junk), "file/sub": str(junk / "sub")}
    args = [paths[a[1:]] if a.startswith("@") else a for a in extra]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "o")]
    if "--steps" not in args:
        args += ["--steps", "2"]
    res = run_cli(*args, "--num-samples", "1")
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
