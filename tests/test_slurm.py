"""A real SLURM: the README's sbatch recipe, scaled to the digits job, on a single-node SLURM this
machine runs (tests/cluster/slurm_up.sh installs and starts it; root only, skipped elsewhere).

The job has a one-minute limit and ``--signal=USR1@50 --requeue``: SLURM signals the training task
before the limit, the task saves the step reached and requeues the job, the requeued job runs the
same command and ``--ckpt_path auto`` resumes it, until training ends, bit-identical to an
uninterrupted run. Also ``scancel --signal=TERM`` (save, stop, resume by resubmitting) and
``srun --ntasks 2`` sampling (each task its shards, one output equal to a one-process run's).
Takes 3-10 minutes (the controller checks time limits every 30 s): ``python -m pytest -m slow
tests/test_slurm.py``. No assertion depends on this machine's speed: the signal may come while
the task still imports (pdm holds it from train.py's first line), and a requeued start gives
itself a longer limit. Passed on SLURM 22.05.8 (Debian 12's) and the version named in the README.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from pdm.checkpoints import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("a local SLURM runs as root")
    up = subprocess.run(
        ["bash", os.path.join(ROOT, "tests", "cluster", "slurm_up.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if up.returncode != 0:
        pytest.skip(f"SLURM could not start here: {up.stderr.strip()[-200:]}")
    yield
    subprocess.run(
        ["bash", os.path.join(ROOT, "tests", "cluster", "slurm_down.sh")], capture_output=True
    )


def _train_args(root, steps):
    from test_reliability import _train_cmd

    return _train_cmd(
        root, steps, "--trainer.callbacks.every_n_train_steps=50", "--ckpt_path", "auto"
    )[1:]


def _submit(script: str, tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.sh"
    path.write_text(script)
    out = subprocess.run(
        ["sbatch", "--parsable", "-o", str(tmp_path / f"{name}.log"), str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(tmp_path),
    )
    return out.stdout.strip().split(";")[0]


def _wait_gone(job: str, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if not subprocess.run(
            ["squeue", "-h", "-j", job], capture_output=True, text=True
        ).stdout.strip():
            return
        time.sleep(2)
    subprocess.run(["scancel", job])
    pytest.fail(f"SLURM job {job} did not finish in {timeout:.0f} s")


def _job_script(root, steps, limit="--time=1 --signal=USR1@50 --requeue", then=None) -> str:
    """A job script of the README's form. ``then``: the time limit (minutes) a requeued start
    gives itself, so that the test does not depend on how fast this machine trains: SLURM's
    USR1@50 of a one-minute job comes at any time in its first 10 s (up to a minute early), on a
    slow CPU while Python still imports, and every start would be stopped again after one step."""
    python = " ".join([sys.executable, *_train_args(root, steps)])
    longer = (
        f'[ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ] && scontrol update JobId=$SLURM_JOB_ID '
        f"TimeLimit={then}\n"
        if then
        else ""
    )
    # --open-mode=append: a requeued start adds to the log instead of emptying it
    return (
        f"#!/bin/bash\n#SBATCH {limit} --open-mode=append\n"
        f"echo restart=${{SLURM_RESTART_COUNT:-0}}\n{longer}srun {python}\n"
    )


def _same_weights(a, b) -> bool:
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_readme_recipe_is_signalled_requeued_and_ends_bit_identical(slurm, tmp_path):
    steps = 400
    job = _submit(_job_script(tmp_path / "run", steps, then=20), tmp_path, "train")
    clean = subprocess.run(
        [sys.executable, *_train_args(tmp_path / "clean", steps)],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=900,
    )
    assert clean.returncode == 0, clean.stderr[-1500:]
    _wait_gone(job, 900)
    log = (tmp_path / "train.log").read_text()
    assert "restart=1" in log, log[-3000:]  # it was signalled, saved, requeued and started again
    assert "stopped by SIGUSR1" in log and "the job is requeued" in log, log[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == steps
    assert _same_weights(last, tmp_path / "clean" / "checkpoints" / "last.ckpt")


def test_scancel_term_saves_and_a_resubmitted_job_finishes_it(slurm, tmp_path):
    steps = 400
    job = _submit(_job_script(tmp_path / "run", steps, "--time=10"), tmp_path, "first")
    checkpoints = tmp_path / "run" / "checkpoints"
    end = time.time() + 300
    while time.time() < end and not (checkpoints / "last.ckpt").exists():
        time.sleep(1)
    assert (checkpoints / "last.ckpt").exists(), (tmp_path / "first.log").read_text()[-2000:]
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    _wait_gone(job, 300)
    first = (tmp_path / "first.log").read_text()
    saved = load_checkpoint(checkpoints / "last.ckpt")["global_step"]
    assert 0 < saved < steps and "stopped by SIGTERM" in first and "Traceback" not in first, first[
        -2000:
    ]
    again = _submit(_job_script(tmp_path / "run", steps, "--time=10"), tmp_path, "second")
    _wait_gone(again, 900)
    assert load_checkpoint(checkpoints / "last.ckpt")["global_step"] == steps


def test_srun_two_tasks_sample_one_output_equal_to_one_process(slurm, tiny_ckpts, tmp_path):
    args = [
        os.path.join(ROOT, "sample.py"),
        "--ckpt",
        tiny_ckpts["cond"],
        "--num-samples",
        "12",
        "--shard-size",
        "2",
        "--steps",
        "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            "srun",
            "--ntasks",
            "2",
            "--kill-on-bad-exit=1",
            sys.executable,
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert (tmp_path / "two" / "samples.npz").read_bytes() == (
        tmp_path / "one" / "samples.npz"
    ).read_bytes()


def test_the_patch_size_ablation_runs_one_job_per_patch_size(slurm, tmp_path):
    """README "Choosing a patch size": one sbatch job per P (``--only P``), then ``--report``."""
    from test_ablation import ABLATION, _config, _env

    config = _config(tmp_path)
    common = [*ABLATION, "--config", str(config), "--root", str(tmp_path / "abl")]
    common += [
        "--samples",
        "8",
        "--checks",
        "2",
        "--patch-sizes",
        "2",
        "8",
        "--budget",
        "steps",
        "4",
    ]
    env = " ".join(f"{k}={v}" for k, v in _env().items() if k in ("PYTHONPATH", "PYTHONWARNINGS"))
    jobs = [
        _submit(
            f"#!/bin/bash\n#SBATCH --time=5 --signal=USR1@90 --requeue\ncd {ROOT}\n"
            f"{env} srun {' '.join(common)} --only {p}\n",
            tmp_path,
            f"P{p}",
        )
        for p in (2, 8)
    ]
    for job in jobs:
        _wait_gone(job, 600)
    for p in (2, 8):
        log = (tmp_path / f"P{p}.log").read_text()
        last = tmp_path / "abl" / f"P{p}" / "checkpoints" / "last.ckpt"
        assert last.exists() and load_checkpoint(last)["global_step"] == 4, log[-2000:]
        started = [line for line in log.splitlines() if line.startswith("ablation: P = ")]
        assert started and all(line.startswith(f"ablation: P = {p}:") for line in started), log
    report = subprocess.run(
        [*common, "--report"], env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert report.returncode == 0, report.stderr[-2000:]
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert {p: r["steps"] for p, r in result["runs"].items()} == {"2": 4, "8": 4}
