"""Two-process DDP on CPU (gloo): ranks see different data and one checkpoint results."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ddp_script.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    seen = {}
    for rank in (0, 1):
        rows = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        seen[rank] = [set(map(int, r.split())) for r in rows if r]
        assert len(seen[rank]) == 3  # three steps on each rank
    for a, b in zip(seen[0], seen[1]):
        assert not (a & b)  # each step, the ranks trained on different samples
    ckpts = sorted(os.listdir(tmp_path / "ckpt"))
    assert ckpts.count("last.ckpt") == 1 and len([c for c in ckpts if c.endswith(".ckpt")]) == 2  # last + epoch file
    for c in ckpts:
        state = torch.load(tmp_path / "ckpt" / c, weights_only=True)
        assert state["global_step"] == 3
