"""What a newcomer tripped over (issue 26), one test per item, each through the command line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL_NET_ARGS, run_main, train_tiny

import calibrate as calibrate_cli
import sample as sample_cli

DIGITS = os.path.join(ROOT, "configs", "digits.yaml")
SMALL = [
    *SMALL_NET_ARGS,
    "--data.init_args.batch_size",
    "16",
    "--trainer.enable_progress_bar",
    "false",
]


def _train(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "fit", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=str(cwd),
        timeout=timeout,
    )


# 1 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module, args",
    [
        (sample_cli, ["--max-skip", "2"]),  # --max-skips
        (sample_cli, ["--solver", "ddim", "--ord", "1"]),  # --order
        (calibrate_cli, ["--nfe", "4", "--num-seed", "2"]),  # --num-seeds
    ],
)
def test_abbreviated_flags_are_refused_not_guessed(module, args, tiny_ckpts, tmp_path, capsys):
    code, err = run_main(
        module, ["--ckpt", tiny_ckpts["cond"], "--out", tmp_path / "o.json", *args], capsys
    )
    assert code == 2 and "unrecognized arguments" in err[-1] and args[-2] in err[-1], err
    assert not (tmp_path / "o.json").exists()


def test_abbreviated_flags_are_refused_by_train_and_the_module_clis(tmp_path, capsys):
    res = _train(["--config", DIGITS, "--trainer.max_step", "5"], tmp_path)
    assert res.returncode == 2 and "max_step" in res.stderr and not (tmp_path / "runs").exists(), (
        res.stderr[-800:]
    )
    from pdm.metrics import __main__ as metrics_cli

    code, err = run_main(
        metrics_cli,
        [
            "ref-stats",
            "--images",
            "digits",
            "--out",
            tmp_path / "r.npz",
            "--feature",
            "digits",
            "--image-siz",
            "8",
        ],
        capsys,
    )
    assert code == 2 and "--image-siz" in err[-1] and not (tmp_path / "r.npz").exists()
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "data", "prepare_cifar10.py"), "--sourc", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "--sourc" in res.stderr


# 2, 6, 7 ----------------------------------------------------------------------------------------
def test_resume_rules_of_train_py(tmp_path):
    root = tmp_path / "run"
    base = ["--config", DIGITS, *SMALL, "--trainer.default_root_dir", root]
    # 2: nothing to resume is one line, before anything is made ("Seed set to 0" no longer precedes it)
    res = _train([*base, "--ckpt_path", "last"], tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "no last.ckpt to resume" in lines[0], (
        res.stderr[-800:]
    )
    assert "--ckpt_path auto" in lines[0] and not root.exists()
    # auto starts a fresh run when there is nothing to resume (job scripts run one command on every start)
    ckpt = train_tiny(str(tmp_path / "tiny"), steps=2, lr_decay="cosine")  # a finished cosine run
    assert torch.load(ckpt, weights_only=True)["pdm_max_steps"] == 2
    net = [
        "--model.net.init_args.image_size",
        "16",
        "--model.net.init_args.patch_size",
        "4",  # the tiny run's net
        "--model.net.init_args.model_channels",
        "32",
        "--data.init_args.image_size",
        "16",
    ]
    # 6: a finished run is not resumed (no empty version_1) ...
    res = _train([*base, *net, "--ckpt_path", ckpt, "--trainer.max_steps", "2"], tmp_path)
    assert (
        res.returncode == 2
        and "has finished (step 2" in res.stderr
        and "--model.init_from" in res.stderr
    )
    # ... and a cosine decay made for 2 steps is not stretched to 5 at a learning rate near 0
    res = _train([*base, *net, "--ckpt_path", ckpt, "--trainer.max_steps", "5"], tmp_path)
    err = res.stderr.strip().splitlines()
    assert (
        res.returncode == 2
        and len(err) == 1
        and "cosine learning-rate decay ending at step 2" in err[0]
    ), err
    assert "--trainer.max_steps 2" in err[0] and not root.exists()


def test_auto_resume_starts_then_resumes_and_the_output_is_quiet(tmp_path):
    root = tmp_path / "run"
    args = [
        "--config",
        DIGITS,
        *SMALL,
        "--trainer.default_root_dir",
        root,
        "--trainer.max_steps",
        "6",
        "--model.lr_decay",
        "none",
        "--trainer.callbacks.num_samples=100",
        "--ckpt_path",
        "auto",
    ]
    res = _train(args, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    # 7: no spurious warnings, and the model summary counts the network's FLOPs
    assert (
        "logging interval" not in res.stderr
        and "set_vital" not in res.stderr
        and "LeafSpec" not in res.stderr
    )
    flops = [
        line.split()[:2]
        for line in (res.stdout + res.stderr).splitlines()
        if line.endswith("Total Flops")
    ]
    assert len(flops) == 1 and flops[0] == ["1.6", "M"], (
        flops
    )  # one 32x32 image through the SMALL net
    # the same command again: resumes the finished run, and says it has finished (no version_1)
    res = _train(args, tmp_path)
    assert res.returncode == 2 and "has finished (step 6" in res.stderr
    assert sorted(os.listdir(root / "lightning_logs")) == ["version_0"]


def test_the_smoke_overlay_writes_nothing_at_all(tmp_path):
    res = _train(
        [
            "--config",
            DIGITS,
            "--config",
            os.path.join(ROOT, "configs", "overlays", "smoke.yaml"),
            *SMALL,
            "--trainer.max_steps",
            "2",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # not even config.yaml


# 3 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [sample_cli, calibrate_cli])
def test_negative_guidance_is_refused(module, tiny_ckpts, tmp_path, capsys):
    extra = ["--nfe", "4"] if module is calibrate_cli else []
    code, err = run_main(
        module,
        [
            "--ckpt",
            tiny_ckpts["cond"],
            "--out",
            tmp_path / "o.json",
            "--guidance-scale",
            "-1",
            *extra,
        ],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "--guidance-scale must be >= 0" in err[0], err


# 4, 5 ------------------------------------------------------------------------------------------
def test_a_schedule_replays_only_for_the_checkpoint_and_scale_it_was_calibrated_for(
    tiny_ckpts, tmp_path, capsys
):
    path = tmp_path / "p.json"
    assert (
        run_main(
            calibrate_cli,
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
                path,
            ],
            capsys,
        )[0]
        == 0
    )
    base = ["--num-samples", "2", "--schedule", path]
    code, err = run_main(
        sample_cli, ["--ckpt", tiny_ckpts["uncond"], *base, "--out", tmp_path / "a"], capsys
    )
    assert (
        code == 2 and len(err) == 1 and f"calibrated for {tiny_ckpts['cond']} (sha256" in err[0]
    ), err
    assert (
        tiny_ckpts["uncond"] in err[0]
        and "--force-schedule" in err[0]
        and not (tmp_path / "a").exists()
    )
    code, err = run_main(
        sample_cli,
        ["--ckpt", tiny_ckpts["cond"], *base, "--guidance-scale", "1.5", "--out", tmp_path / "b"],
        capsys,
    )
    assert (
        code == 2 and len(err) == 1 and "calibrated at --guidance-scale 1.0, not 1.5" in err[0]
    ), err
    code, _ = run_main(
        sample_cli,
        [
            "--ckpt",
            tiny_ckpts["cond"],
            *base,
            "--guidance-scale",
            "1.5",
            "--force-schedule",
            "--out",
            tmp_path / "b",
        ],
        capsys,
    )
    assert code == 0 and np.load(tmp_path / "b" / "samples.npz")["arr_0"].shape[0] == 2
    code, err = run_main(
        sample_cli,
        ["--ckpt", tiny_ckpts["cond"], "--force-schedule", "--out", tmp_path / "c"],
        capsys,
    )
    assert code == 2 and "--force-schedule does nothing without --schedule" in err[-1]


def test_a_changed_checkpoint_is_named_by_its_file(tiny_ckpts, tmp_path, capsys):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    shutil.copy(tiny_ckpts["cond"], last)
    args = ["--ckpt", last, "--num-samples", "2", "--steps", "2", "--out", tmp_path / "s"]
    assert run_main(sample_cli, args, capsys)[0] == 0
    shutil.copy(tiny_ckpts["uncond"], last)  # training went on: last.ckpt moved
    code, err = run_main(sample_cli, args, capsys)
    assert code == 2 and len(err) == 1 and f"checkpoint {last} changed since (sha256" in err[0], err
    assert "last.ckpt moves with training" in err[0] and "--overwrite" in err[0]


# 8 ---------------------------------------------------------------------------------------------
def test_ref_stats_reads_what_the_prepare_scripts_write(tmp_path, capsys):
    import datasets
    from PIL import Image

    from pdm.metrics import __main__ as metrics_cli

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in images], "label": list(range(6))}, features=features
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(
        str(tmp_path / "cifar10")
    )  # prepare_cifar10.py's layout
    np.savez(tmp_path / "same.npz", arr_0=images)
    for src, out in ((tmp_path / "cifar10", "hf.npz"), (tmp_path / "same.npz", "npz.npz")):
        code, err = run_main(
            metrics_cli,
            ["ref-stats", "--images", src, "--out", tmp_path / out, "--feature", "digits"],
            capsys,
        )
        assert code == 0, err
    a, b = np.load(tmp_path / "hf.npz"), np.load(tmp_path / "npz.npz")
    assert (
        int(a["n"]) == 6 and np.allclose(a["mu"], b["mu"]) and np.allclose(a["sigma"], b["sigma"])
    )
    code, err = run_main(
        metrics_cli,
        [
            "ref-stats",
            "--images",
            tmp_path / "cifar10",
            "--split",
            "test",
            "--out",
            tmp_path / "t.npz",
            "--feature",
            "digits",
        ],
        capsys,
    )
    assert code == 2 and "no split 'test' (splits: train)" in err[-1]


def test_missing_data_names_its_one_script_and_help_does_not_point_at_itself(tmp_path):
    from pdm.data import HFDataModule

    with pytest.raises(ValueError) as e:
        HFDataModule(name=str(tmp_path / "cifar10"))
    assert "data/prepare_cifar10.py" in str(e.value) and "prepare_imagenet" not in str(e.value)
    with pytest.raises(ValueError) as e:
        HFDataModule(name=str(tmp_path / "imagenet-1k"), image_key="image")
    assert "data/prepare_imagenet.py" in str(e.value) and "prepare_cifar10" not in str(e.value)
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "data", "prepare_cifar10.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "see --help" not in res.stdout


# 9 ---------------------------------------------------------------------------------------------
def test_calibrate_speaks_from_the_first_second(tiny_ckpts, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "calibrate.py"),
            "--ckpt",
            tiny_ckpts["cond"],
            "--nfe",
            "3",
            "--steps",
            "6",
            "--num-seeds",
            "2",
            "--out",
            str(tmp_path / "p.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stderr.readline()  # before the checkpoint is loaded
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, rest[-2000:]
    assert first.startswith("calibrate.py: loading") and "6-step grid" in first
    assert "calibration: reference solution" in rest and "calibration: sensitivities" in rest
    assert "\r" not in rest  # a log file gets lines, not a progress bar's carriage returns
    assert proc.stdout.read() == ""  # everything it says is on stderr
    assert json.loads((tmp_path / "p.json").read_text())["calibrated_for"]["files"] == [
        tiny_ckpts["cond"]
    ]


# 10 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64])
def test_the_small_image_folder_configs_train_on_your_own_images(tmp_path, size):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(40):  # photographs of any size: centre-cropped and resized to the config's
        Image.fromarray(rng.integers(0, 256, (48 + i, 70, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "fit", "--config"]
        + [
            os.path.join(ROOT, "configs", f"folder{size}.yaml"),
            "--data.init_args.root",
            str(folder),
        ]
        + ["--trainer.default_root_dir", str(run), "--trainer.max_steps", "2"]
        + ["--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0"]
        + ["--trainer.enable_progress_bar", "false"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["net"]["init_args"]["image_size"] == size
    assert "digits FD" not in res.stdout + res.stderr  # no score meant for other images


def test_the_digits_score_switches_itself_off_on_other_images(tmp_path, capsys):
    from types import SimpleNamespace

    from pdm.data import DigitsDataModule, ImageFolderDataModule
    from pdm.training import DigitsFD

    fd = DigitsFD()
    fd.setup(
        SimpleNamespace(datamodule=ImageFolderDataModule(root=str(tmp_path)), is_global_zero=True),
        None,
        "fit",
    )
    said = capsys.readouterr().err.strip().splitlines()
    assert not fd.enabled and len(said) == 1 and "not the embedded digits" in said[0]
    fd.on_train_end(SimpleNamespace(is_global_zero=True), None)  # does nothing, samples nothing
    on_digits = DigitsFD()
    on_digits.setup(
        SimpleNamespace(datamodule=DigitsDataModule(), is_global_zero=True), None, "fit"
    )
    assert on_digits.enabled and capsys.readouterr().err == ""


def test_help_texts_say_what_a_newcomer_needs(tmp_path, capsys):
    out = subprocess.run(
        [sys.executable, "-m", "pdm.checkpoints", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    assert "convert OFFICIAL.pt" in out and "--schedule FILE" in out and "--skip-paths" not in out
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), "--help"], capture_output=True, text=True
    ).stdout
    flat = " ".join(out.split())
    for default in ("(default 64)", "(default 1.0: none", "(default 0)"):
        assert default in flat, default
    from pdm.metrics.fid import load_images

    with pytest.raises(ValueError, match="does not exist"):
        load_images(tmp_path / "nothing_here")


def test_the_digits_config_keeps_the_checkpoints_the_readme_names():
    import yaml

    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "digits.yaml")))
    saver = next(
        c["init_args"]
        for c in config["trainer"]["callbacks"]
        if c["class_path"].endswith("RunCheckpoint")
    )
    # every periodic save is kept: step0000400.ckpt and step0000800.ckpt beside last.ckpt
    assert saver["save_top_k"] == -1 and saver["every_n_train_steps"] == 400
    assert config["trainer"]["max_steps"] == 800 and saver["save_last"]
