"""One run per folder at a time, resumes that continue the run they resume, and a fresh start that
is fresh: sampling and training folders are locked (a second concurrent run is refused, a dead
run's lock taken over), a resume that changes a setting is refused naming it, --overwrite discards
what a folder holds."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest

import sample as sample_cli
from pdm.locks import FolderLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample(tiny_ckpts, out, *extra):
    args = [
        "--ckpt",
        tiny_ckpts["cond"],
        "--num-samples",
        "4",
        "--steps",
        "3",
        "--out",
        str(out),
        *extra,
    ]
    return sample_cli.main([str(a) for a in args])


def _race(tiny_ckpts, out, seed, barrier, results):
    """A child process: wait at the barrier right before taking the lock, then sample."""
    real = FolderLock.acquire

    def at_the_barrier(self):
        barrier.wait(timeout=60)
        return real(self)

    FolderLock.acquire = at_the_barrier
    try:
        _sample(tiny_ckpts, out, "--seed", seed)
        results.put((seed, 0))
    except SystemExit as e:
        results.put((seed, e.code))


def test_two_sampling_runs_started_together_one_is_refused_nothing_mixed(tiny_ckpts, tmp_path):
    ctx = mp.get_context("spawn")  # fork would copy torch's thread pool mid-use
    barrier, results, out = ctx.Barrier(2), ctx.Queue(), tmp_path / "out"
    procs = [
        ctx.Process(target=_race, args=(tiny_ckpts, out, seed, barrier, results)) for seed in (1, 2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    codes = dict(results.get(timeout=5) for _ in procs)
    assert sorted(codes.values()) == [0, 2], codes
    winner = next(s for s, c in codes.items() if c == 0)
    ident = json.loads((out / "run.json").read_text())["identity"]
    assert ident["settings"]["seed"] == winner and not (out / ".lock").exists()
    again = tmp_path / "again"
    _sample(tiny_ckpts, again, "--seed", winner)  # the winner's images, made alone
    assert (again / "samples.npz").read_bytes() == (out / "samples.npz").read_bytes()


def test_a_live_holder_refuses_and_a_dead_ones_lock_is_taken_over(tiny_ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    with FolderLock(out, "the output folder"):  # held by this (live) process
        with pytest.raises(SystemExit) as e:
            _sample(tiny_ckpts, out)
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            e.value.code == 2
            and len(err) == 1
            and f"is in use by another run (pid {os.getpid()}" in err[0]
        )
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(
        json.dumps(
            {
                "host": os.uname().nodename,
                "pid": dead.pid,
                "started": time.time(),
                "command": "sample.py (killed)",
            }
        )
    )
    stats = _sample(tiny_ckpts, out)
    assert stats["num_samples"] == 4 and "took over the lock" in capsys.readouterr().err
    assert not (out / ".lock").exists()
    (out / ".lock").write_text(json.dumps({"host": "another-host", "pid": 1, "started": 0}))
    with pytest.raises(SystemExit):
        _sample(tiny_ckpts, out)
    assert "on host another-host" in capsys.readouterr().err


def test_overwrite_starts_afresh_even_with_the_same_settings(tiny_ckpts, tmp_path):
    out = tmp_path / "out"
    _sample(tiny_ckpts, out)
    first = (out / "shards" / "shard_00000.npz").stat().st_mtime_ns
    resumed = _sample(tiny_ckpts, out)
    assert resumed["images_sampled_this_run"] == 0  # the same command resumes: nothing to make
    fresh = _sample(tiny_ckpts, out, "--overwrite")
    assert fresh["images_sampled_this_run"] == 4
    assert (out / "shards" / "shard_00000.npz").stat().st_mtime_ns > first


def _train(root, max_steps, *extra):
    from test_reliability import _train_cmd

    return subprocess.run(
        _train_cmd(root, max_steps, *extra),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(root.parent),
    )


def test_training_folders_are_locked_and_a_resume_never_changes_what_the_run_is(tmp_path):
    root = tmp_path / "run"
    with FolderLock(root, "the run folder"):
        held = _train(root, 2)
    assert (
        held.returncode == 2 and "is in use by another run" in held.stderr.strip().splitlines()[-1]
    )
    assert _train(root, 2).returncode == 0 and not (root / ".lock").exists()
    for change, name in (
        (["--model.net.init_args.patch_size", "4"], "net.init_args.patch_size 8 -> 4"),
        (["--model.lr", "0.001"], "lr 0.005 -> 0.001"),
    ):
        res = _train(root, 4, "--ckpt_path", "last", *change)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and "Traceback" not in res.stderr and name in lines[-1], (
            res.stderr[-800:]
        )
        assert "--model.init_from" in lines[-1]
    assert _train(root, 4, "--ckpt_path", "last").returncode == 0  # unchanged, it resumes


def test_a_bad_step_count_is_one_line(tmp_path):
    from test_reliability import _assert_one_error

    res = _train(tmp_path / "run", -5)
    _assert_one_error(res, "max_steps")
