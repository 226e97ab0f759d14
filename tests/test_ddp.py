"""Two-process DDP on CPU (gloo): ranks see different data, one checkpoint results, and a run
resumed mid-epoch trains on exactly the batches of an uninterrupted one."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT  # noqa: E402


def _ddp(out, max_steps, ckpt=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        os.path.join(ROOT, "tests", "ddp_script.py"),
        str(out),
        str(max_steps),
    ] + ([str(ckpt)] if ckpt else [])
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=str(out))
    assert res.returncode == 0, res.stderr[-3000:]


def _batches(out):
    """{rank: {step: labels}} recorded by the ranks."""
    seen = {}
    for rank in (0, 1):
        rows = [r.split() for r in (out / f"rank{rank}.txt").read_text().splitlines() if r]
        seen[rank] = {int(r[0]): r[1:] for r in rows}
    return seen


def test_ddp_two_cpu_processes(tmp_path):
    _ddp(tmp_path, 3)
    seen = _batches(tmp_path)
    assert sorted(seen[0]) == sorted(seen[1]) == [0, 1, 2]  # three steps on each rank
    ckpts = sorted(os.listdir(tmp_path / "checkpoints"))
    assert "last.ckpt" in ckpts
    for c in ckpts:
        assert torch.load(tmp_path / "checkpoints" / c, weights_only=True)["global_step"] >= 1


@pytest.mark.slow
def test_ddp_resume_mid_epoch_continues_the_same_batches(tmp_path):
    # 1797 digits, batch 200 per rank, 2 ranks: 4 steps per epoch; stop at step 6 (mid-epoch 1)
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    _ddp(full, 9)
    _ddp(cut, 6)
    _ddp(cut, 9, cut / "checkpoints" / "last.ckpt")
    a, b = _batches(full), _batches(cut)
    assert a == b
    assert a[0][0] != a[1][0]  # the ranks train on different samples
    assert a[0][0] != a[0][4]  # epochs are shuffled differently
