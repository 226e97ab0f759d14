"""Training that is pre-empted, fills its disk or meets bad numbers keeps its work.

Every run here goes through the real CLI (``python train.py fit ...``) unless it needs a hook
the CLI does not have (an injected NaN, an injected disk error)."""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT  # noqa: E402

from pdm.checkpoints import load_checkpoint

HELPERS = os.path.join(ROOT, "tests", "helpers")
TINY = [
    "--model.net.init_args.model_channels",
    "16",
    "--model.net.init_args.channel_mult",
    "[1]",
    "--model.net.init_args.attention_resolutions",
    "[]",
    "--model.warmup_steps",
    "2",
    "--data.init_args.batch_size",
    "8",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.check_val_every_n_epoch",
    "1000",
    "--trainer.logger",
    "false",
    "--trainer.callbacks",
    "[]",
    "--trainer.callbacks+=pdm.training.EMA",
    "--trainer.callbacks.decay=0.9",
    "--trainer.callbacks+=pdm.training.RunCheckpoint",
    "--trainer.callbacks.save_last=true",
    "--trainer.callbacks.every_n_train_steps=1000",
]


def train(root, max_steps, *extra, env=None, timeout=300):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "digits.yaml"),
        *TINY,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        str(max_steps),
        *extra,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(env or {}),
    }
    os.makedirs(root, exist_ok=True)
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=str(root), env=env, timeout=timeout
    )


def signal_at(step: int, name: str) -> list[str]:
    return [
        "--trainer.callbacks+=signal_at.SignalAt",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.signame={name}",
    ]


def same_state(a: dict, b: dict) -> None:
    """Bit-identical weights, EMA, optimiser state and step."""
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}[{k}] differs"
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()
    ):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), (
                f"optimiser {k} differs"
            )


def test_sigterm_at_a_random_step_saves_that_step_exits_unfinished_and_resumes_bit_identically(
    tmp_path,
):
    total = 12
    step = random.Random().randint(2, total - 3)  # any step; the outcome must not depend on which
    whole = train(tmp_path / "whole", total)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = train(tmp_path / "cut", total, *signal_at(step, "SIGTERM"))
    assert cut.returncode == 128 + signal.SIGTERM, cut.stderr[
        -2000:
    ]  # a scheduler sees an unfinished run
    message = [
        line for line in cut.stderr.splitlines() if line.startswith("train.py: stopped by SIGTERM")
    ]
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert message == [
        f"train.py: stopped by SIGTERM after step {step + 1}; saved {last}; resume with --ckpt_path last"
    ]
    assert (
        load_checkpoint(last)["global_step"] == step + 1
    )  # the step in flight was finished, then saved
    resumed = train(tmp_path / "cut", total, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_state(
        load_checkpoint(last), load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    )


def slurm_task(job: str, log) -> dict:
    """The environment of a one-task srun job, with a stand-in scontrol that logs its call."""
    return {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_ID": job,
        "SLURM_JOB_NAME": "pdm",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": HELPERS + os.pathsep + os.environ["PATH"],
        "SCONTROL_LOG": str(log),
    }


def test_sigusr1_under_slurm_saves_and_asks_for_a_requeue(tmp_path):
    log = tmp_path / "scontrol.log"
    slurm = slurm_task("4242", log)
    res = train(tmp_path, 50, *signal_at(3, "SIGUSR1"), env=slurm)
    assert res.returncode == 128 + signal.SIGUSR1, res.stderr[-2000:]
    assert "stopped by SIGUSR1 after step 4" in res.stderr and "the job is requeued" in res.stderr
    assert log.read_text().split() == ["requeue", "4242"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    mask = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt")), 16)
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process's signal mask in /proc")
@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM"])
def test_a_signal_during_start_up_is_acted_on_when_training_can(tmp_path, name):
    # SLURM's --signal can come a minute early, while Python still imports: the job must not die
    log = tmp_path / "scontrol.log"
    slurm = slurm_task("4343", log)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "fit", "--config"]
    cmd += [os.path.join(ROOT, "configs", "digits.yaml"), *TINY]
    cmd += ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "50"]
    proc = subprocess.Popen(
        cmd, cwd=str(tmp_path), env={**os.environ, **slurm}, stderr=subprocess.PIPE, text=True
    )
    signum = getattr(signal, name)
    deadline = time.time() + 60
    while time.time() < deadline and not _catches(proc.pid, signum):
        time.sleep(0.001)
    assert not _torch_libraries(proc.pid)  # still starting: torch is not even loaded
    proc.send_signal(signum)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"stopped by {name} after step 1" in err
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 1
    if name == "SIGUSR1":  # SLURM's requeue signal: the job goes back in the queue
        assert "the job is requeued" in err and log.read_text().split() == ["requeue", "4343"]
    else:
        assert "resume with --ckpt_path last" in err and not log.exists()


def _torch_libraries(pid: int) -> list[str]:
    """torch's shared libraries the process has mapped (none while it is still starting)."""
    try:
        maps = open(f"/proc/{pid}/maps").read()
    except OSError:
        return []
    return [ln.rsplit("/", 1)[-1] for ln in maps.splitlines() if "libtorch" in ln]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the second rank through /proc")
def test_two_ddp_processes_signalled_mid_epoch_save_once_and_both_exit_within_60_s(tmp_path):
    script = os.path.join(ROOT, "tests", "ddp_script.py")
    proc = subprocess.Popen(
        [sys.executable, script, str(tmp_path), "100000", "--preempt"],
        cwd=str(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not all(
        (tmp_path / f"rank{r}.txt").exists()
        and len((tmp_path / f"rank{r}.txt").read_text().splitlines()) >= 2
        for r in (0, 1)
    ):
        time.sleep(0.05)
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid]
    assert children, "rank 1 never started"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)  # the job's main process, as a scheduler signals it
    _, err = proc.communicate(timeout=60)
    for child in children:
        while os.path.exists(f"/proc/{child}") and _state(child) != "Z" and time.time() - t0 < 60:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{child}") or _state(child) == "Z", "rank 1 still running"
    assert time.time() - t0 < 60
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert os.listdir(tmp_path / "checkpoints") == ["last.ckpt"]  # one checkpoint, saved once
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"]
    steps = [len((tmp_path / f"rank{r}.txt").read_text().splitlines()) for r in (0, 1)]
    assert steps[0] == steps[1] == saved  # both ranks stopped after the same step, the one saved


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_one_and_exits_2(
    tmp_path, monkeypatch, capsys
):
    import train as train_cli

    saves = {"n": 0}
    real_save = torch.save

    def filling_disk(obj, f, *a, **k):
        saves["n"] += 1
        if (
            saves["n"] == 3
        ):  # step 2 saved its checkpoint and last.ckpt; step 4's save runs out of space half-way
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling_disk)
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "digits.yaml"),
        *TINY[:-1],
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.max_steps",
        "10",
    ]
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as e:
        train_cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.startswith("train.py:")]
    folder = tmp_path / "checkpoints"
    assert e.value.code == 2 and len(err) == 1
    assert "No space left on device" in err[0] and str(folder) in err[0] and "free" in err[0]
    assert sorted(os.listdir(folder)) == [
        "epoch=0-step=2.ckpt",
        "last.ckpt",
    ]  # no partial file left
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == 2  # the previous saves load
    assert load_checkpoint(folder / "epoch=0-step=2.ckpt")["global_step"] == 2


def test_a_bad_image_stops_training_naming_the_file_or_is_skipped_and_counted(tmp_path):
    import numpy as np
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for i in range(40):
        Image.fromarray(np.full((16, 16, 3), i * 5, dtype=np.uint8)).save(data / f"{i:02d}.png")
    (data / "07.png").write_bytes((data / "07.png").read_bytes()[:30])  # truncated
    folder = [
        "--data.class_path",
        "pdm.data.ImageFolderDataModule",
        "--data.init_args.root",
        str(data),
        "--data.init_args.image_size",
        "16",
        "--data.init_args.channels",
        "3",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "8",
        "--model.net.init_args.in_channels",
        "3",
        "--model.net.init_args.image_size",
        "16",
        "--model.net.init_args.patch_size",
        "4",
        "--model.net.init_args.num_classes",
        "null",
    ]
    stopped = train(tmp_path / "a", 12, *folder)
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("train.py: error")]
    assert (
        stopped.returncode == 2
        and len(lines) == 1
        and "07.png" in lines[0]
        and "skip_bad_images" in lines[0]
    )
    skipped = train(
        tmp_path / "b",
        12,
        *folder,
        "--data.init_args.skip_bad_images",
        "true",
        "--data.init_args.max_bad_fraction",
        "0.05",
    )
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert (
        "skipped unreadable image" in skipped.stderr
        and "07.png" in skipped.stderr
        and "1 skipped so far" in skipped.stderr
    )


def _nan_from(steps):
    from pdm.training import PDMModule

    class Exploding(PDMModule):
        def loss_per_sample(self, x0, y, **kw):
            loss, n = super().loss_per_sample(x0, y, **kw)
            return (loss * float("nan") if steps(self.global_step) else loss), n

    return Exploding


def _fit(module, root, max_steps, callbacks=()):
    import lightning as L

    from pdm.data import DigitsDataModule

    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        default_root_dir=str(root),
        enable_checkpointing=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=DigitsDataModule(image_size=16, batch_size=16, val_fraction=0.0))
    return trainer


def test_nonfinite_skip_leaves_weights_ema_and_optimiser_untouched(tmp_path):
    import lightning as L
    from conftest import tiny_module

    from pdm.training import EMA

    snapshots = {}
    ema = EMA(decay=0.9)

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            opt = trainer.optimizers[0].state_dict()["state"]
            snapshots[batch_idx] = (
                {k: v.clone() for k, v in module.net.state_dict().items()},
                {k: v.clone() for k, v in ema.ema_module.state_dict().items()},
                {
                    i: {k: torch.as_tensor(v).clone() for k, v in st.items()}
                    for i, st in opt.items()
                },
                trainer.global_step,
            )

    model = tiny_module(_nan_from(lambda step: step == 3), model_channels=16, nonfinite="skip")
    _fit(model, tmp_path, 6, [ema, Snapshot()])
    before, after = snapshots[3], snapshots[4]  # batch 3 met the NaN at step 3
    assert (before[3], after[3]) == (
        3,
        4,
    )  # the trainer counts the batch, but nothing reached the optimiser:
    for i in (0, 1):  # weights and EMA untouched
        assert all(torch.equal(before[i][k], after[i][k]) for k in before[i])
    assert all(
        torch.equal(before[2][p][k], after[2][p][k]) for p in before[2] for k in before[2][p]
    )  # Adam state
    assert not all(
        torch.equal(after[0][k], snapshots[5][0][k]) for k in after[0]
    )  # training went on after it
    assert model.nonfinite_skips == 0


def test_nonfinite_skip_gives_up_after_the_limit_of_consecutive_skips(tmp_path):
    from conftest import tiny_module

    model = tiny_module(
        _nan_from(lambda step: step >= 2),
        model_channels=16,
        nonfinite="skip",
        max_nonfinite_skips=3,
    )
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite losses"):
        _fit(model, tmp_path, 20)
    assert model.nonfinite_skips == 3


def test_retention_keeps_the_newest_three_and_every_fifth_save_for_good(tmp_path):
    import yaml

    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "lsun_church_p4.yaml")))["trainer"][
        "callbacks"
    ]
    rolling, keep = [c["init_args"] for c in cfg if c["class_path"] == "pdm.training.RunCheckpoint"]
    assert (rolling["save_top_k"], rolling["monitor"], keep["save_top_k"]) == (3, "step", -1)
    assert keep["every_n_train_steps"] == 5 * rolling["every_n_train_steps"]
    # the same two callbacks, their intervals scaled down from 10k / 50k steps to 1 / 5
    scaled = [
        "--trainer.callbacks",
        "[]",
        "--trainer.callbacks+=pdm.training.RunCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=3",
        "--trainer.callbacks.monitor=step",
        "--trainer.callbacks.mode=max",
        "--trainer.callbacks.filename=step{step:07d}",
        "--trainer.callbacks.auto_insert_metric_name=false",
        "--trainer.callbacks+=pdm.training.RunCheckpoint",
        "--trainer.callbacks.every_n_train_steps=5",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename=keep_step{step:07d}",
        "--trainer.callbacks.auto_insert_metric_name=false",
    ]
    res = train(tmp_path, 12, *scaled)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "keep_step0000005.ckpt",
        "keep_step0000010.ckpt",
        "last.ckpt",
        "step0000010.ckpt",
        "step0000011.ckpt",
        "step0000012.ckpt",
    ]
