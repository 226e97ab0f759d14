"""Reliability: safe loading, atomic checkpoints, kills during training, non-finite losses,
and clean command-line errors."""

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pdm.checkpoints import AtomicCheckpointIO, export_safetensors, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_malicious_pickle_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Payload(str(marker))}, f)
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(evil)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(evil), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "refused" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()


def test_safetensors_export_samples_like_the_checkpoint(tiny_ckpts, tmp_path):
    st = export_safetensors(tiny_ckpts["cond"], str(tmp_path / "model.safetensors"))
    outs = []
    for src, name in ((tiny_ckpts["cond"], "a"), (st, "b")):
        res = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", src, "--num-samples", "3",
                              "--steps", "4", "--out", str(tmp_path / name)], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        outs.append(np.load(tmp_path / name / "samples.npz")["arr_0"])
    assert np.array_equal(outs[0], outs[1])


def test_checkpoint_write_that_dies_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as fh:  # the atomic writer hands torch.save a temporary path
            fh.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["global_step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_non_finite_loss_stops_with_step_and_batch_and_keeps_last_checkpoint(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pdm.data import DigitsDataModule
    from pdm.training import PDMModule

    class Exploding(PDMModule):
        def loss_per_sample(self, x0, y):
            loss, n = super().loss_per_sample(x0, y)
            return (loss * float("nan") if self.global_step == 3 else loss), n

    ckpt_dir = tmp_path / "ckpt"
    trainer = L.Trainer(max_steps=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, accelerator="cpu", default_root_dir=str(tmp_path),
                        plugins=[AtomicCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_train_steps=1)])
    from conftest import tiny_module

    model = tiny_module(Exploding, model_channels=16)
    with pytest.raises(FloatingPointError, match=r"global step 3, batch 3"):
        trainer.fit(model, datamodule=DigitsDataModule(image_size=16, batch_size=16, val_fraction=0.0))
    last = load_checkpoint(ckpt_dir / "last.ckpt")
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


TRAIN_ARGS = ["--model.net.init_args.model_channels", "16", "--model.net.init_args.channel_mult", "[1]",
              "--model.net.init_args.attention_resolutions", "[]",
              "--data.init_args.batch_size", "8", "--trainer.enable_progress_bar", "false",
              "--trainer.check_val_every_n_epoch", "1000", "--trainer.logger", "false",
              "--trainer.callbacks", "[]", "--trainer.callbacks+=pdm.training.RunCheckpoint",
              "--trainer.callbacks.save_last=true", "--trainer.callbacks.every_n_train_steps=1",
              "--trainer.callbacks.save_top_k=-1"]


def _train_cmd(root, max_steps, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "fit", "--config", os.path.join(ROOT, "configs", "digits.yaml"),
            *TRAIN_ARGS, "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(max_steps), *extra]


@pytest.mark.slow
def test_training_killed_repeatedly_resumes_and_every_checkpoint_loads(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    steps_seen = []
    for kill_after in (0.0, 0.3, 0.05):  # right after a save starts, a little later, almost at once
        extra = ["--ckpt_path", str(last)] if last.exists() else []
        proc = subprocess.Popen(_train_cmd(tmp_path, 10_000, *extra), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=str(tmp_path))
        start_mtime = last.stat().st_mtime_ns if last.exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and (not last.exists() or last.stat().st_mtime_ns == start_mtime):
            time.sleep(0.01)
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for f in os.listdir(tmp_path / "checkpoints"):
            if f.endswith(".ckpt"):
                load_checkpoint(tmp_path / "checkpoints" / f)  # every checkpoint on disk loads
        steps_seen.append(load_checkpoint(last)["global_step"])
    assert steps_seen[0] >= 1 and steps_seen[1] > steps_seen[0] and steps_seen[2] > steps_seen[1]
    target = steps_seen[-1] + 2
    res = subprocess.run(_train_cmd(tmp_path, target, "--ckpt_path", str(last)), capture_output=True, text=True,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_checkpoint(last)["global_step"] == target


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.net.init_args.patch_size", "5"], "not divisible by patch_size=5"),
        (["--model.target", "score"], "model.target"),
        (["--data.class_path", "pdm.data.ImageFolderDataModule", "--data.init_args.root", "/no/such/folder"],
         "does not exist"),
    ],
)
def test_train_cli_bad_input_exits_2_with_one_line(tmp_path, extra, message):
    res = subprocess.run(_train_cmd(tmp_path, 1, *extra), capture_output=True, text=True, cwd=str(tmp_path))
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
