"""Reliability: safe loading, atomic checkpoints, kills during training, non-finite losses,
and clean command-line errors."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL_NET_ARGS  # noqa: E402

from pdm.checkpoints import AtomicCheckpointIO, export_safetensors, load_checkpoint


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
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "sample.py"),
            "--ckpt",
            str(evil),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 2 and "refused" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()


def test_safetensors_export_samples_like_the_checkpoint(tiny_ckpts, tmp_path):
    st = export_safetensors(tiny_ckpts["cond"], str(tmp_path / "model.safetensors"))
    outs = []
    for src, name in ((tiny_ckpts["cond"], "a"), (st, "b")):
        res = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "sample.py"),
                "--ckpt",
                src,
                "--num-samples",
                "3",
                "--steps",
                "4",
                "--out",
                str(tmp_path / name),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
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
        def loss_per_sample(self, x0, y, **kw):
            loss, n = super().loss_per_sample(x0, y, **kw)
            return (loss * float("nan") if self.global_step == 3 else loss), n

    ckpt_dir = tmp_path / "ckpt"
    trainer = L.Trainer(
        max_steps=10,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        default_root_dir=str(tmp_path),
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_train_steps=1)],
    )
    from conftest import tiny_module

    model = tiny_module(Exploding, model_channels=16)
    with pytest.raises(FloatingPointError, match=r"global step 3, batch 3"):
        trainer.fit(
            model, datamodule=DigitsDataModule(image_size=16, batch_size=16, val_fraction=0.0)
        )
    last = load_checkpoint(ckpt_dir / "last.ckpt")
    assert last["global_step"] == 3
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )


TRAIN_ARGS = [
    *SMALL_NET_ARGS,
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
    "--trainer.callbacks+=pdm.training.RunCheckpoint",
    "--trainer.callbacks.save_last=true",
    "--trainer.callbacks.every_n_train_steps=1",
    "--trainer.callbacks.save_top_k=-1",
]


def _train_cmd(root, max_steps, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "digits.yaml"),
        *TRAIN_ARGS,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        str(max_steps),
        "--model.lr_decay",
        "none",  # these runs are extended; a cosine decay would not be stretched (refused)
        *extra,
    ]


@pytest.mark.slow
def test_training_killed_repeatedly_resumes_and_every_checkpoint_loads(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    steps_seen = []
    for kill_after in (0.0, 0.3, 0.05):  # right after a save starts, a little later, almost at once
        extra = ["--ckpt_path", str(last)] if last.exists() else []
        proc = subprocess.Popen(
            _train_cmd(tmp_path, 10_000, *extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=str(tmp_path),
        )
        start_mtime = last.stat().st_mtime_ns if last.exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and (
            not last.exists() or last.stat().st_mtime_ns == start_mtime
        ):
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
    res = subprocess.run(
        _train_cmd(tmp_path, target, "--ckpt_path", str(last)),
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_checkpoint(last)["global_step"] == target


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.net.init_args.patch_size", "5"], "not divisible by patch_size=5"),
        (["--model.target", "score"], "model.target"),
        (
            [
                "--data.class_path",
                "pdm.data.ImageFolderDataModule",
                "--data.init_args.root",
                "/no/such/folder",
            ],
            "does not exist",
        ),
    ],
)
def test_train_cli_bad_input_exits_2_with_one_line(tmp_path, extra, message, monkeypatch, capsys):
    res = _train_in_process(tmp_path, 1, *extra, monkeypatch=monkeypatch, capsys=capsys)
    _assert_one_error(res, message)


# --- a run owns its folder (issue: outputs overwritten, mixed or stale) ---------------------------------


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def _train_in_process(tmp_path, max_steps, *extra, monkeypatch, capsys):
    """train.py's main in this process, for inputs that must stop before any work (fast)."""
    import train

    monkeypatch.setattr(
        sys, "argv", ["train.py", *_train_cmd(tmp_path / "run", max_steps, *extra)[2:]]
    )
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    try:
        train.main()
        code = 0
    except SystemExit as e:
        code = e.code
    return _Result(code, capsys.readouterr().err)


def _assert_one_error(res, message):
    """Exit 2, at most three lines on stderr, the last one the error naming ``message``, no traceback."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and 1 <= len(lines) <= 3 and "Traceback" not in res.stderr, (
        res.stderr[-1500:]
    )
    assert "error:" in lines[-1] and message in lines[-1], lines


def _train(root, max_steps, *extra, cwd):
    return subprocess.run(
        _train_cmd(root, max_steps, *extra),
        capture_output=True,
        text=True,
        cwd=str(cwd),
        timeout=300,
    )


@pytest.mark.slow  # 36 s: four train.py runs; one-run-per-folder is held by test_run_folders
def test_two_runs_keep_their_checkpoints_apart_and_each_resumes_its_own(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, 2, cwd=tmp_path).returncode == 0
    snapshot = {f: (a / "checkpoints" / f).read_bytes() for f in os.listdir(a / "checkpoints")}
    assert _train(b, 3, cwd=tmp_path).returncode == 0
    assert {
        f: (a / "checkpoints" / f).read_bytes() for f in os.listdir(a / "checkpoints")
    } == snapshot  # untouched
    assert sorted(os.listdir(b / "checkpoints")) == [
        "last.ckpt",
        "step=1.ckpt",
        "step=2.ckpt",
        "step=3.ckpt",
    ] or "last.ckpt" in os.listdir(b / "checkpoints")
    assert load_checkpoint(b / "checkpoints" / "last.ckpt")["global_step"] == 3
    for root, target in ((a, 4), (b, 5)):
        res = _train(root, target, "--ckpt_path", "last", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        assert load_checkpoint(root / "checkpoints" / "last.ckpt")["global_step"] == target
    assert not any(
        f.startswith("last-v")
        for f in os.listdir(a / "checkpoints") + os.listdir(b / "checkpoints")
    )
    # a fresh run into a folder that holds checkpoints refuses, touching nothing
    before = (a / "checkpoints" / "last.ckpt").read_bytes()
    res = _train(a, 6, cwd=tmp_path)
    _assert_one_error(res, "already holds checkpoints")
    assert (
        "--ckpt_path last" in res.stderr
        and (a / "checkpoints" / "last.ckpt").read_bytes() == before
    )


def test_a_saved_config_reruns_the_run(tmp_path):
    cmd = _train_cmd(tmp_path / "first", 2)
    cmd[cmd.index("--trainer.logger") + 1] = "true"  # the config is saved beside the logs
    assert subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path)).returncode == 0
    saved = tmp_path / "first" / "lightning_logs" / "version_0" / "config.yaml"
    text = saved.read_text()
    assert "Unable to serialize" not in text and "AtomicCheckpointIO" not in text
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "fit",
            "--config",
            str(saved),
            "--trainer.default_root_dir",
            str(tmp_path / "again"),
        ],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_checkpoint(tmp_path / "again" / "checkpoints" / "last.ckpt")["global_step"] == 2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.ckpt", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: _write(d / "empty.ckpt", b""), "is empty"),
        (
            lambda d: _write(d / "cut.ckpt", (d / "good.ckpt").read_bytes()[:5000]),
            "not a readable PyTorch checkpoint",
        ),
        (
            lambda d: Path(export_safetensors(str(d / "good.ckpt"), str(d / "w.safetensors"))),
            "holds weights only",
        ),
    ],
)
def test_bad_ckpt_path_exits_2_with_one_line(
    tmp_path, tiny_ckpts, make, message, monkeypatch, capsys
):
    import shutil

    shutil.copyfile(tiny_ckpts["uncond"], tmp_path / "good.ckpt")
    res = _train_in_process(
        tmp_path, 2, "--ckpt_path", str(make(tmp_path)), monkeypatch=monkeypatch, capsys=capsys
    )
    _assert_one_error(res, message)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--model.net.init_args.image_size", "64"],
            "image_size=32 but the network was built for image_size=64",
        ),
        (
            ["--data.init_args.image_size", "28"],
            "image_size=28 but the network was built for image_size=32",
        ),
        (["--data.init_args.val_fraction", "1.0"], "val_fraction must be in [0, 1)"),
        (["--model.lr", "-1"], "lr must be a positive finite number"),
        (["--model.lr", "nan"], "model.lr"),
    ],
)
def test_mismatched_or_empty_training_setups_stop_before_training(
    tmp_path, extra, message, monkeypatch, capsys
):
    res = _train_in_process(tmp_path, 2, *extra, monkeypatch=monkeypatch, capsys=capsys)
    _assert_one_error(res, message)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- export, experts, and review findings ----------------------------------------------------------------


def test_export_never_overwrites_its_input_and_needs_the_safetensors_suffix(tiny_ckpts, tmp_path):
    import shutil

    ckpt = tmp_path / "x.ckpt"
    shutil.copyfile(tiny_ckpts["cond"], ckpt)
    before = ckpt.read_bytes()
    from pdm.checkpoints.__main__ import main as export_main

    for out in (ckpt, tmp_path / "w.pt"):
        with pytest.raises(SystemExit) as e:
            export_main([str(ckpt), str(out)])
        assert e.value.code == 2
    assert ckpt.read_bytes() == before
    same = tmp_path / "same.safetensors"
    shutil.copyfile(ckpt, same)
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        export_safetensors(str(same), str(same), overwrite=True)
    export_safetensors(str(ckpt), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="exists; choose another name or pass --overwrite"):
        export_safetensors(str(ckpt), str(tmp_path / "w.safetensors"))


def test_a_safetensors_file_without_config_names_the_export_command(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="python -m pdm.checkpoints"):
        load_checkpoint(tmp_path / "bare.safetensors")


def test_experts_with_different_beta_ends_do_not_pair(tmp_path):
    from conftest import train_tiny

    from pdm.checkpoints import load_for_sampling

    high = train_tiny(str(tmp_path / "high"), steps=1, num_classes=10, time_range=(396, 999))
    low = train_tiny(
        str(tmp_path / "low"), steps=1, num_classes=10, time_range=(0, 395), beta_end=0.025
    )
    with pytest.raises(ValueError, match="disagree on beta_end"):
        load_for_sampling([high, low])


@pytest.mark.parametrize(
    "time_range, kind",
    [((396, 999), "x0_at_step396"), ((0, 395), "from_data_noised_to_step395"), (None, "samples")],
)
def test_an_expert_grid_samples_only_inside_its_own_time_range(time_range, kind):
    from conftest import tiny_module

    from pdm.sampling import Settings
    from pdm.training import sample_images

    module = tiny_module(num_classes=10, time_range=time_range)
    labels_seen = []
    net_forward = module.net.forward

    def spy(x, t_label, y=None):
        labels_seen.append(t_label.clone())
        return net_forward(x, t_label, y)

    module.net.forward = spy
    start = torch.zeros(4, 1, 16, 16)
    x, tag = sample_images(
        module,
        4,
        Settings(steps=5, solver="dpmsolver++", order=2, grid="time_uniform"),
        start_images=start,
    )
    assert tag == kind and x.shape == (4, 1, 16, 16)
    seen = torch.cat(labels_seen)
    lo, hi = time_range or (0, 999)
    assert seen.min().item() >= lo - 0.5 and seen.max().item() <= hi + 0.5
