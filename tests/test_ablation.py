"""Quality during training (QualityMonitor) and the patch-size ablation driver (pdm.ablation).

Every run here is a real train.py run on a tiny network; the scores go through torchmetrics'
Fréchet distance with a small stand-in feature extractor (8x8 grey levels), no downloaded weights.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "train.py"), "fit"]
ABLATION = [sys.executable, "-m", "pdm.ablation"]
TINY = {
    "seed_everything": 0,
    "trainer": {
        "max_steps": 4,
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "logger": True,  # config.yaml is saved beside the logs
        "enable_progress_bar": False,
        "check_val_every_n_epoch": 1000,
        "callbacks": [
            {"class_path": "pdm.training.EMA", "init_args": {"decay": 0.9}},
            {"class_path": "pdm.training.SampleGrid", "init_args": {"every_n_steps": 1000}},
            {
                "class_path": "pdm.training.RunCheckpoint",
                "init_args": {"every_n_train_steps": 1, "save_last": True},
            },
        ],
    },
    "model": {
        "net": {
            "class_path": "pdm.nn.UNet",
            "init_args": {
                "in_channels": 1,
                "image_size": 32,
                "patch_size": 4,
                "model_channels": 16,
                "channel_mult": [1],
                "num_res_blocks": 1,
                "attention_resolutions": [8],
                "num_classes": 10,
            },
        },
        "lr": 1e-3,
        "warmup_steps": 0,
    },
    "data": {
        "class_path": "pdm.data.DigitsDataModule",
        "init_args": {"image_size": 32, "batch_size": 8, "num_workers": 0},
    },
}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}


def _run(cmd: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """A command line of the project, run from its root, its output kept as text."""
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, cwd=ROOT, **kw)


def _train(tmp_path: Path, run: Path, *args: str) -> subprocess.CompletedProcess:
    """train.py on the tiny config into ``run``."""
    cmd = TRAIN + ["--config", str(_config(tmp_path)), "--trainer.default_root_dir", str(run)]
    return _run(cmd + list(args))


def _config(tmp_path: Path, **trainer) -> Path:
    config = json.loads(json.dumps(TINY))
    config["trainer"].update(trainer)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _quality(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "quality.jsonl").read_text().splitlines()]


def _step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


# -- QualityMonitor ---------------------------------------------------------------------------


def test_quality_monitor_scores_against_stored_statistics_and_keeps_the_best(tmp_path):
    ref = tmp_path / "ref.npz"
    made = _run(
        [sys.executable, "-m", "pdm.metrics", "ref-stats", "--images", "digits"]
        + ["--feature", "digits", "--out", str(ref)]
    )
    assert made.returncode == 0, made.stderr
    run = tmp_path / "run"
    monitor = ["--trainer.callbacks+=pdm.training.QualityMonitor"]
    monitor += ["--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.num_samples=16"]
    monitor += ["--trainer.callbacks.feature=digits", f"--trainer.callbacks.reference={ref}"]
    monitor += ["--trainer.callbacks.max_cost=100"]
    out = _train(tmp_path, run, *monitor)
    assert out.returncode == 0, out.stderr[-3000:]
    checks = _quality(run)
    assert [c["step"] for c in checks] == [2, 4]
    per_step = checks[0]["train_flops"] / 2
    assert per_step > 1e8
    for c in checks:
        assert c["images_seen"] == 8 * c["step"]
        assert c["train_flops"] == pytest.approx(per_step * c["step"])
        assert math.isfinite(c["fd8x8"]) and c["fd8x8"] > 0
        assert c["train_seconds"] > 0 and c["check_seconds"] > 0
    assert "checks took" in out.stderr and "of the training time" in out.stderr

    # the score is torchmetrics' FD of the checks' samples against the stored statistics:
    # recompute it from the same samples drawn with the EMA weights of best.ckpt
    best = run / "checkpoints" / "best.ckpt"
    best_check = min(checks, key=lambda c: c["fd8x8"])
    assert _step_of(best) == best_check["step"]
    from pdm.checkpoints.models import load_model, network_model_fn
    from pdm.images import to_uint8
    from pdm.metrics import FeatureStats, digits_fd_metric, fid_against
    from pdm.sampling import Settings, sample

    model = load_model(str(best))  # its EMA weights
    noise = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(12345))
    settings = Settings(steps=10, solver="ipndm", order=3, grid="time_quadratic")
    with torch.no_grad():
        x = sample(
            network_model_fn(model.net, model.schedule),
            noise,
            model.schedule,
            settings,
            prediction=model.target,
            model_kwargs={"y": torch.arange(16) % 10},
        ).x
    again = fid_against(digits_fd_metric(), FeatureStats.load(ref), to_uint8(x))
    assert again == pytest.approx(best_check["fd8x8"], rel=1e-4)


def test_quality_monitor_cost_is_bounded_and_it_is_off_without_reference(tmp_path):
    run = tmp_path / "run"
    bounded = ["--trainer.callbacks+=pdm.training.QualityMonitor"]
    bounded += ["--trainer.callbacks.every_n_steps=1", "--trainer.callbacks.num_samples=8"]
    bounded += ["--trainer.callbacks.feature=digits", "--trainer.callbacks.max_cost=0"]
    out = _train(tmp_path, run, *bounded)
    assert out.returncode == 0, out.stderr[-3000:]
    # max_cost 0: the first check is free, every later one would exceed the share; the end's is kept
    assert [c["step"] for c in _quality(run)] == [1, 4]

    off = tmp_path / "off"
    out = _train(
        tmp_path, off, "--trainer.callbacks+=pdm.training.QualityMonitor", "--trainer.max_steps=2"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if line.startswith("QualityMonitor:")]
    assert len(said) == 1 and "ref-stats" in said[0]
    assert not (off / "quality.jsonl").exists()
    assert not (off / "checkpoints" / "best.ckpt").exists()


def test_quality_monitor_refuses_what_would_fail_at_the_first_check(tmp_path):
    """Missing Inception weights, or statistics of the other feature, stop the run before its
    first step in one line (exit 2), not at the first check hours later."""
    ref = tmp_path / "ref.npz"
    from pdm.metrics import FeatureStats

    FeatureStats(np.zeros(64), np.eye(64), 100).save(ref)
    wide = tmp_path / "wide.npz"
    FeatureStats(np.zeros(128), np.eye(128), 100).save(wide)
    base = TRAIN + ["--config", str(_config(tmp_path)), "--trainer.default_root_dir"]
    monitor = ["--trainer.callbacks+=pdm.training.QualityMonitor"]
    monitor += [f"--trainer.callbacks.reference={ref}"]
    env = {**_env(), "TORCH_HOME": str(tmp_path / "torch_home")}  # no cached Inception weights
    env.pop("PDM_INCEPTION_WEIGHTS", None)
    for run, extra, says in (
        ("a", [], "Inception-v3 weights not found"),
        (
            "b",
            [
                "--trainer.callbacks.feature=digits",
                "--trainer.callbacks.reference=" + str(tmp_path / "none.npz"),
            ],
            "ref-stats",
        ),
        (
            "c",
            ["--trainer.callbacks.feature=digits", f"--trainer.callbacks.reference={wide}"],
            "128-dimensional",
        ),
    ):
        out = _run(base + [str(tmp_path / run), *monitor, *extra], env=env)
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("train.py: error")]
        assert out.returncode == 2 and len(lines) == 1 and says in lines[0], out.stderr[-2000:]
        assert not (tmp_path / run / "checkpoints").exists()  # no step was taken


# -- the driver --------------------------------------------------------------------------------


def _ablate(tmp_path, *args, extra=(), **kw):
    cmd = ABLATION + ["--config", str(_config(tmp_path)), "--root", str(tmp_path / "abl")]
    cmd += ["--samples", "8", "--checks", "2", *args]
    if extra:
        cmd += ["--", *extra]
    return _run(cmd, **kw)


def test_driver_makes_one_run_per_patch_size_resumes_and_reports(tmp_path):
    out = _ablate(tmp_path, "--patch-sizes", "2", "8", "--budget", "steps", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    abl = tmp_path / "abl"
    for p in (2, 8):
        folder = abl / f"P{p}"
        recorded = yaml.safe_load(next(folder.rglob("config.yaml")).read_text())
        net = recorded["model"]["net"]["init_args"]
        assert net["patch_size"] == p
        assert net["attention_resolutions"] == [32 // p]  # the same level of the U-Net
        assert net["model_channels"] == 16  # nothing else changed
        classes = [c["class_path"] for c in recorded["trainer"]["callbacks"]]
        assert "pdm.training.SampleGrid" not in classes
        assert classes[-1] == "pdm.training.QualityMonitor"
        assert [c["step"] for c in _quality(folder)] == [2, 4]
        assert _step_of(folder / "checkpoints" / "last.ckpt") == 4
    report = json.loads((abl / "ablation.json").read_text())
    for p in ("2", "8"):
        row, checks = report["runs"][p], report["curves"][p]
        assert row["steps"] == 4 and row["checks"] == 2
        assert row["best"] == min(c["fd8x8"] for c in checks)
        assert row["final"] == checks[-1]["fd8x8"]
    # a smaller patch costs more per step: counted FLOPs, measured time
    assert report["runs"]["2"]["train_flops"] > 3 * report["runs"]["8"]["train_flops"]
    table = (abl / "ablation.md").read_text()
    assert table.count("\n| 2 |") == 2 and table.count("\n| 8 |") == 2  # its run, its summary
    for image in ("ablation.png", "samples.png"):
        assert (abl / image).stat().st_size > 1000

    # each run scored on the held-out digits with its EMA weights: a curve and bits/dim
    for p in ("2", "8"):
        held = json.loads((abl / f"P{p}" / "heldout.json").read_text())
        assert held["held_out_images"] == 89 and held["conditional"]  # digits' 5% validation split
        assert len(held["rmse"]) == 24 and math.isfinite(held["bits_per_dim"])
        assert report["runs"][p]["bits_per_dim"] == held["bits_per_dim"]
    assert (abl / "noise_levels.png").stat().st_size > 1000
    assert "one seed per value gives no interval" in table

    again = _ablate(tmp_path, "--patch-sizes", "2", "8", "--budget", "steps", "4")
    assert again.returncode == 0
    assert again.stderr.count("is finished; skipped") == 2
    assert [c["step"] for c in _quality(abl / "P8")] == [2, 4]

    # folders of the previous driver (no held-out score, no run identity, the old done marker)
    # are read as they are: the report scores them and is otherwise the same
    for p in (2, 8):
        for name in ("heldout.json", "ablation_run.json"):
            (abl / f"P{p}" / name).unlink()
        (abl / f"P{p}" / "ablation_done.json").write_text(json.dumps({"patch_size": p, "steps": 4}))
    old = _ablate(tmp_path, "--patch-sizes", "2", "8", "--budget", "steps", "4", "--report")
    assert old.returncode == 0, old.stderr[-3000:]
    again = json.loads((abl / "ablation.json").read_text())
    for p in ("2", "8"):
        assert again["runs"][p]["final"] == report["runs"][p]["final"]
        assert again["runs"][p]["bits_per_dim"] == report["runs"][p]["bits_per_dim"]


def test_repeats_of_another_axis_record_their_change_and_report_intervals(tmp_path):
    out = _ablate(
        tmp_path,
        *("--vary", "model.prediction", "eps", "x", "--seeds", "2", "--budget", "steps", "2"),
        *("--heldout-images", "16", "--bins", "4"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    abl = tmp_path / "abl"
    for target in ("eps", "x0"):  # x is the paper's name for x0
        for seed, folder in enumerate((abl / f"target-{target}", abl / f"target-{target}_seed1")):
            recorded = yaml.safe_load(next(folder.rglob("config.yaml")).read_text())
            assert recorded["model"]["target"] == target
            assert recorded["model"]["net"]["init_args"]["patch_size"] == 4  # nothing else moved
            assert recorded["seed_everything"] == seed
            assert recorded["data"]["init_args"]["seed"] == 0  # the same held-out split
            assert recorded["data"]["init_args"]["shuffle_seed"] == (1 if seed else None)
            identity = json.loads((folder / "ablation_run.json").read_text())
            assert identity == {**identity, "key": "model.target", "value": target, "seed": seed}
            held = json.loads((folder / "heldout.json").read_text())
            assert held["target"] == target and len(held["rmse"]) == 4
    # different seeds trained differently; the same seed of two targets saw the same noise draws
    first = torch.load(abl / "target-eps" / "checkpoints" / "last.ckpt", weights_only=True)
    second = torch.load(abl / "target-eps_seed1" / "checkpoints" / "last.ckpt", weights_only=True)
    name = next(k for k in first["state_dict"] if k.endswith("weight"))
    assert not torch.equal(first["state_dict"][name], second["state_dict"][name])
    report = json.loads((abl / "ablation.json").read_text())
    assert report["axis"] == "model.target" and report["values"] == ["eps", "x0"]
    assert set(report["runs"]) == {"eps", "eps/seed1", "x0", "x0/seed1"}
    summary = report["summary"]["eps"]["bits_per_dim"]
    assert len(summary["values"]) == 2 and summary["half_width"] > 0
    assert {(t["a"], t["b"]) for t in report["differences"]["bits_per_dim"]} == {("eps", "x0")}
    table = (abl / "ablation.md").read_text()
    assert "| eps | 2 |" in table and "Welch" in table
    assert (abl / "noise_levels.png").stat().st_size > 1000


def test_runs_are_picked_one_at_a_time_and_bad_picks_refused(tmp_path, capsys):
    from pdm.ablation.driver import load_config, main, parse_args, plan

    config = load_config(str(_config(tmp_path)))
    three = ["--config", "x", "--root", str(tmp_path), "--budget", "steps", "3", "--seeds", "3"]
    args, _ = parse_args([*three, "--patch-sizes", "8", "2", "--task", "4"])
    (run,) = plan(config, args)
    assert run.folder.name == "P8_seed1" and run.value == 8 and run.seed == 1  # finest P first
    args, _ = parse_args([*three, "--patch-sizes", "2", "8", "--only", "8", "--seed", "2"])
    assert [r.folder.name for r in plan(config, args)] == ["P8_seed2"]
    main(
        [
            "--config",
            str(_config(tmp_path)),
            "--root",
            str(tmp_path / "abl"),
            "--budget",
            "steps",
            "3",
            "--seeds",
            "2",
            "--patch-sizes",
            "2",
            "8",
            "--plan",
        ]
    )
    listed = capsys.readouterr().out
    assert "| 3 | P8_seed1 | 8 |" in listed and "| 0 | P2 | 2 |" in listed
    for bad, says in (
        (["--seeds", "2", "--only", "8", "--seed", "2"], "--seed 2 is not one of"),
        (["--seeds", "2", "--seed", "1"], "give --only too"),
        (["--task", "9"], "numbered 0..1"),
        (["--vary", "model.target", "eps", "--patch-sizes", "2"], "not both"),
        (["--vary", "model.target", "eps", "eps"], "repeat"),
    ):
        argv = ["--config", "x", "--root", "r", "--budget", "steps", "3", *bad]
        if "--patch-sizes" not in bad and "--vary" not in bad:
            argv += ["--patch-sizes", "2", "8"]
        with pytest.raises(ValueError, match=says):
            parse_args(argv)
    args, _ = parse_args(
        ["--config", "x", "--root", "r", "--budget", "steps", "3", "--vary", "model.target", "tau"]
    )
    with pytest.raises(ValueError, match="unknown prediction target"):
        plan(config, args)


def test_a_killed_ablation_resumes_where_it_stopped(tmp_path):
    cmd = ABLATION + ["--config", str(_config(tmp_path)), "--root", str(tmp_path / "abl")]
    cmd += ["--samples", "8", "--checks", "3", "--patch-sizes", "8", "--budget", "steps", "60"]
    cmd += ["--seeds", "2", "--task", "1", "--heldout-images", "8", "--bins", "2"]
    folder = tmp_path / "abl" / "P8_seed1"  # one (value, seed) of a repeated ablation
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            cmd, env=_env(), stdout=log, stderr=log, cwd=ROOT, start_new_session=True
        )
        deadline = time.time() + 240
        while time.time() < deadline and not (folder / "quality.jsonl").exists():
            time.sleep(0.2)
        assert (folder / "quality.jsonl").exists(), (tmp_path / "first.log").read_text()[-3000:]
        os.kill(first.pid, signal.SIGTERM)  # the driver alone: it passes the signal on
        assert first.wait(timeout=120) == 128 + signal.SIGTERM
    said = (tmp_path / "first.log").read_text()
    assert "was stopped by signal 15 and saved; run the same command again" in said
    stopped_at = _step_of(folder / "checkpoints" / "last.ckpt")
    assert 0 < stopped_at < 60
    assert not (folder / "ablation_done.json").exists()

    again = _run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restoring states from the checkpoint" in again.stderr or "resum" in again.stderr
    assert _step_of(folder / "checkpoints" / "last.ckpt") == 60
    steps = [c["step"] for c in _quality(folder)]
    assert steps[0] == 20 and steps[-1] == 60
    assert steps == sorted(steps) and set(steps) <= {20, 40, 60, stopped_at}
    assert (folder / "heldout.json").exists()
    assert not (tmp_path / "abl" / "P8").exists()  # the other seed was not touched
    assert not (tmp_path / "abl" / "ablation.json").exists()  # a task does not report
    report = _run(cmd[: cmd.index("--task")] + ["--report"])
    assert report.returncode == 0, report.stderr[-3000:]
    report = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert report["runs"]["8/seed1"]["steps"] == 60 and report["runs"]["8"]["steps"] is None


def test_each_budget_stops_the_runs_where_it_says(tmp_path):
    from pdm.ablation.driver import load_config, step_flops

    config = load_config(str(_config(tmp_path)))
    f2, f8 = step_flops(config, 2), step_flops(config, 8)
    budget = 3.5 * f8
    out = _ablate(tmp_path, "--patch-sizes", "2", "8", "--budget", "flops", f"{budget:.6g}")
    assert out.returncode == 0, out.stderr[-3000:]
    for p, per_step in ((2, f2), (8, f8)):
        expected = math.ceil(float(f"{budget:.6g}") / per_step)
        last = _quality(tmp_path / "abl" / f"P{p}")[-1]
        assert last["step"] == expected
        # the FLOPs counted in the live run agree with the plan's, and the budget is just met
        assert last["train_flops"] >= float(f"{budget:.6g}") > last["train_flops"] - per_step
    assert _quality(tmp_path / "abl" / "P8")[-1]["step"] == 4

    timed = tmp_path / "timed"
    timed.mkdir()
    out = _ablate(timed, "--patch-sizes", "8", "--budget", "time", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    last = _quality(timed / "abl" / "P8")[-1]
    assert 3 <= last["train_seconds"] < 3 + 10
    assert last["step"] >= 1
    recorded = yaml.safe_load(next((timed / "abl" / "P8").rglob("config.yaml")).read_text())
    assert recorded["model"]["lr_decay"] == "none"  # no step count for a decay to aim at


def test_cifar_without_its_dataset_stops_at_once_naming_the_script(tmp_path):
    out = _run(
        ABLATION
        + ["--config", "configs/cifar10_p4.yaml", "--patch-sizes", "2", "4"]
        + ["--budget", "steps", "10", "--root", str(tmp_path / "abl")]
        + ["--", "--data.init_args.name=" + str(tmp_path / "cifar10")],
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "data/prepare_cifar10.py" in lines[0], out.stderr
    assert not (tmp_path / "abl").exists()


@pytest.mark.slow  # 26 s: the CIFAR-10 config end to end on a stand-in dataset
def test_cifar_config_with_the_smoke_overlay_and_a_stand_in_dataset_runs_end_to_end(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(24)]
    data = tmp_path / "cifar10"
    datasets.Dataset.from_dict(
        {"img": images, "label": [i % 10 for i in range(24)]},
        features=datasets.Features(
            {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
        ),
    ).save_to_disk(str(data))
    ref = tmp_path / "ref.npz"
    made = _run(
        [sys.executable, "-m", "pdm.metrics", "ref-stats", "--images", str(data)]
        + ["--feature", "digits", "--out", str(ref)]
    )
    assert made.returncode == 0, made.stderr
    out = _run(
        ABLATION
        + ["--config", "configs/cifar10_p4.yaml", "--patch-sizes", "4", "8"]
        + ["--budget", "steps", "2", "--root", str(tmp_path / "abl"), "--samples", "8"]
        + ["--feature", "digits", "--reference", str(ref), "--"]
        + ["--config", "configs/overlays/smoke.yaml", f"--data.init_args.name={data}"]
        + ["--data.init_args.batch_size=4", "--data.init_args.num_workers=0"]
        + ["--model.net.init_args.model_channels=32", "--trainer.precision=32-true"]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    for p in ("4", "8"):
        row = report["runs"][p]
        assert row["steps"] == 2 and row["metric"] == "fd8x8" and math.isfinite(row["final"])
    # the overrides reached the plan: a 32-channel network, not the config's 192
    assert report["runs"]["4"]["parameters"] < 2e6


def test_a_quality_log_cut_off_by_a_kill_keeps_its_whole_records(tmp_path):
    from pdm.ablation.report import read_quality

    good = [json.dumps({"step": s, "fd8x8": 1.0 / s}) for s in (2, 4)]
    (tmp_path / "quality.jsonl").write_text("\n".join([*good, '{"step": 6, "fd8'] + [""]))
    assert [c["step"] for c in read_quality(tmp_path)] == [2, 4]
    (tmp_path / "quality.jsonl").write_text("\n".join([good[0], '{"step"', good[1]]))
    with pytest.raises(ValueError, match="line 2"):
        read_quality(tmp_path)
