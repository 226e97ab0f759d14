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
from pdm import locks
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
    with pytest.raises(SystemExit):  # renewed just now, by a host this one cannot check
        _sample(tiny_ckpts, out)
    err = capsys.readouterr().err
    assert "pid 1 on another-host" in err and "goes stale at" in err
    old = time.time() - locks.STALE - 5  # that host stopped renewing it: the lease ran out
    os.utime(out / ".lock", (old, old))
    stats = _sample(tiny_ckpts, out)
    assert "its lease was last renewed" in capsys.readouterr().err


def _lock(folder, age: float = 0.0, **owner) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps({"started": time.time() - age, **owner}))
    os.utime(folder / ".lock", (time.time() - age, time.time() - age))


def test_leases_decide_which_locks_hold_a_run(tmp_path, monkeypatch):
    host = os.uname().nodename
    me = {"host": host, "pid": os.getpid(), "pid_start": locks._start_of(os.getpid())}
    cases = [
        # (owner, age, SLURM environment of the new run, taken over?)
        (me, 0, {}, False),  # a live run of this host
        ({"host": "node-a", "pid": 4242}, 10, {}, False),  # another host's, renewed 10 s ago
        ({"host": "node-a", "pid": 4242}, locks.STALE + 1, {}, True),  # ... not renewed
        # a requeued job on another node: the same SLURM job's earlier start, at once
        (
            {"host": "node-a", "pid": 4242, "slurm_job": "77", "slurm_restart": 0},
            1,
            {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"},
            True,
        ),
        # the same job and start (two steps of one job script): the lease decides
        (
            {"host": "node-a", "pid": 4242, "slurm_job": "77", "slurm_restart": 1},
            1,
            {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"},
            False,
        ),
        ({"host": "node-a", "pid": 4242, "slurm_job": "76"}, 1, {"SLURM_JOB_ID": "77"}, False),
        # a reused pid: pid 1 lives, but it is not the process that wrote the lock
        ({"host": host, "pid": 1, "pid_start": "another-boot:12"}, 1, {}, True),
    ]
    for i, (owner, age, env, taken) in enumerate(cases):
        folder = tmp_path / f"case{i}"
        _lock(folder, age, **owner)
        for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        if taken:
            with FolderLock(folder, "the run folder") as lock:
                assert (
                    lock.held and json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
                )
        else:
            with pytest.raises(ValueError, match="in use by another run") as e:
                FolderLock(folder, "the run folder").acquire()
            assert "goes stale at" in str(e.value), i


def test_a_held_lock_is_renewed_while_its_run_lives(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT", 0.05)
    with FolderLock(tmp_path / "run", "the run folder") as lock:
        old = time.time() - 100
        os.utime(lock.path, (old, old))
        deadline = time.time() + 10
        while time.time() < deadline and time.time() - lock.path.stat().st_mtime > 50:
            time.sleep(0.05)
        assert time.time() - lock.path.stat().st_mtime < 50  # renewed: a live run keeps its lease
    assert not lock.path.exists()


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
