"""Experts of different patch sizes: a coarse high-noise expert and a fine low-noise one, split
at a log SNR both read from one place; routing, counted calls and FLOPs, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_main, tiny_module, train_tiny

import sample as sample_cli
from pdm.checkpoints.models import load_for_sampling, split_step
from pdm.schedule import VPSchedule

SPLIT = math.log(0.25)  # PDM's ImageNet split, SNR 0.25: step 396 of the linear schedule


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    return {
        # a coarse (P = 8) high-noise expert and a fine (P = 2) low-noise one, one split
        "high": train_tiny(
            str(root / "high"), patch_size=8, expert="high_noise", split_log_snr=SPLIT
        ),
        "low": train_tiny(str(root / "low"), patch_size=2, expert="low_noise", split_log_snr=SPLIT),
        "whole8": train_tiny(str(root / "whole8"), patch_size=8),
        "whole2": train_tiny(str(root / "whole2"), patch_size=2),
        "other_size": train_tiny(
            str(root / "size"), image_size=32, expert="low_noise", split_log_snr=SPLIT
        ),
        "classes": train_tiny(
            str(root / "classes"), num_classes=10, expert="low_noise", split_log_snr=SPLIT
        ),
    }


def test_the_split_gives_each_expert_its_steps():
    assert split_step(VPSchedule.linear(), SPLIT) == 396
    assert tiny_module(expert="high_noise", split_log_snr=SPLIT).time_range == (396, 999)
    assert tiny_module(expert="low_noise", split_log_snr=SPLIT).time_range == (0, 395)
    for kw, says in (
        ({"expert": "high_noise"}, "needs the pair's split"),
        ({"split_log_snr": 0.0}, "needs model.expert"),
        ({"expert": "high_noise", "split_log_snr": 30.0}, "leaves one expert no steps"),
        ({"expert": "low_noise", "split_log_snr": SPLIT, "time_range": (0, 300)}, "contradicts"),
    ):
        with pytest.raises(ValueError, match=says):
            tiny_module(**kw)


def test_each_step_goes_to_the_expert_that_owns_it_and_the_calls_are_counted(mixed):
    from pdm.metrics.cost import count_call_flops

    loaded = load_for_sampling([mixed["low"], mixed["high"]])
    count_call_flops(loaded.experts)
    high, low = loaded.experts
    assert (high.name, high.patch_size, low.name, low.patch_size) == (
        "high_noise",
        8,
        "low_noise",
        2,
    )
    assert low.flops_per_call > 8 * high.flops_per_call  # 16x the positions, counted
    s = loaded.schedule
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    times = s.t_of_label(torch.tensor([999.0, 396.0, 395.0]))
    routed = loaded.model_fn(x, times)
    # the stand-ins differ, so each row's output shows which expert ran it
    from pdm.checkpoints.models import load_model, network_model_fn

    for path, rows in ((mixed["high"], [0, 1]), (mixed["low"], [2])):
        m = load_model(path)
        alone = network_model_fn(m.net, m.schedule)(x[rows], times[rows])
        torch.testing.assert_close(routed[rows], alone)
    assert (high.images, low.images) == (2, 1)
    record = loaded.network_record(images=3)
    expected = (2 * high.flops_per_call + low.flops_per_call) / 3 / 1e9
    assert record["sampling_gflops_per_image"] == pytest.approx(expected)
    assert record["experts"]["high_noise"]["image_calls"] == 2


def test_sample_py_reports_calls_per_expert_and_flops_per_image(mixed, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(
        sample_cli,
        ["--ckpt", mixed["high"], "--ckpt", mixed["low"], "--num-samples", "4", "--steps", "6"]
        + ["--solver", "dpmsolver++", "--grid", "time_uniform", "--out", out],
        capsys,
    )
    assert code == 0, err
    stats = json.loads((out / "stats.json").read_text())["network_this_run"]
    high, low = stats["experts"]["high_noise"], stats["experts"]["low_noise"]
    assert (high["patch_size"], low["patch_size"]) == (8, 2)
    # 6 time-uniform steps from t = 1: 4 of them above step 396, 2 below, for 4 images
    assert (high["image_calls"], low["image_calls"]) == (16, 8)
    flops = (16 * high["gflops_per_image_call"] + 8 * low["gflops_per_image_call"]) / 4
    assert stats["sampling_gflops_per_image"] == pytest.approx(flops)


def test_a_split_outside_the_experts_trained_steps_and_mismatched_pairs_are_refused(
    mixed, tmp_path, capsys
):
    # two whole-schedule models route at any split (a split search); experts only at their own
    pair = load_for_sampling([mixed["whole8"], mixed["whole2"]], split_log_snr=0.0)
    assert sorted(e.patch_size for e in pair.experts) == [2, 8]
    with pytest.raises(ValueError, match="outside the experts' trained steps"):
        load_for_sampling([mixed["high"], mixed["low"]], split_log_snr=2.0)
    assert load_for_sampling([mixed["high"], mixed["low"]], split_log_snr=SPLIT).experts
    for other, says in (("other_size", "image_size"), ("classes", "num_classes")):
        code, err = run_main(
            sample_cli,
            ["--ckpt", mixed["high"], "--ckpt", mixed[other], "--num-samples", "1"]
            + ["--steps", "2", "--out", tmp_path / other],
            capsys,
        )
        assert code == 2 and len(err) == 1 and f"disagree on {says}" in err[0], err


def test_the_split_is_proposed_where_the_coarse_curve_parts_from_the_fine_one(tmp_path):
    from pdm.ablation.split import proposed_split, runs_of

    edges = [-10.0, -6.0, -2.0, 2.0, 6.0, 10.0]
    base = [1.0, 0.8, 0.5, 0.2, 0.05]
    for p, factor in ((2, [1, 1, 1, 1, 1]), (8, [1, 1.0, 1.0, 1.5, 2.0])):
        for seed, jitter in enumerate((0.0, 0.01, -0.01)):
            name = f"P{p}" if seed == 0 else f"P{p}_seed{seed}"
            (tmp_path / name).mkdir()
            rmse = [b * f * (1 + jitter) for b, f in zip(base, factor)]
            (tmp_path / name / "heldout.json").write_text(
                json.dumps({"log_snr_edges": edges, "rmse": rmse, "bits_per_dim": 1.0})
            )
    assert [p.name for p in runs_of(tmp_path, "P8")] == ["P8", "P8_seed1", "P8_seed2"]
    split, curve = proposed_split(tmp_path, coarse=8, fine=2)
    assert split == 2.0 and curve["worse_bins"] == [4.0, 8.0]


def test_the_expert_configs_compose_into_a_pair_of_different_patch_sizes(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, SMALL_NET_ARGS

    ckpts = []
    for name in ("small32_high_p8", "small32_low_p4"):
        run = tmp_path / name
        res = subprocess.run(
            [sys.executable, f"{ROOT}/train.py", "fit", "--config", f"{ROOT}/configs/digits.yaml"]
            + ["--config", f"{ROOT}/configs/experts/digits_split.yaml"]
            + ["--config", f"{ROOT}/configs/experts/{name}.yaml", *SMALL_NET_ARGS[:4]]
            + ["--trainer.max_steps", "2", "--trainer.default_root_dir", str(run)]
            + ["--data.init_args.batch_size", "8", "--trainer.enable_progress_bar", "false"]
            + ["--trainer.callbacks", "[]", "--trainer.callbacks+=pdm.training.RunCheckpoint"]
            + ["--trainer.callbacks.save_last=true"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=str(tmp_path),
        )
        assert res.returncode == 0, res.stderr[-3000:]
        ckpts.append(str(run / "checkpoints" / "last.ckpt"))
    loaded = load_for_sampling(ckpts)
    assert [(e.name, e.patch_size) for e in loaded.experts] == [("high_noise", 8), ("low_noise", 4)]
    split = float(
        open(f"{ROOT}/configs/experts/digits_split.yaml").read().split("split_log_snr:")[1]
    )
    k = split_step(loaded.schedule, split)
    assert [e.time_range for e in loaded.experts] == [(k, 999), (0, k - 1)]
