"""The benchmarks' own promises: seeds that tune or calibrate are never the seeds scored."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import skip_tradeoff  # noqa: E402
from benchmarks.common import CALIBRATION_SEEDS, SCORE_SEEDS  # noqa: E402


def test_calibration_and_scoring_seeds_are_disjoint():
    assert not set(SCORE_SEEDS) & set(CALIBRATION_SEEDS)
    score, calib = skip_tradeoff.score_seeds(48), skip_tradeoff.calibration_seeds(32)
    assert set(score) <= set(SCORE_SEEDS) and set(calib) <= set(CALIBRATION_SEEDS)
    assert not set(score) & set(calib)
    val = skip_tradeoff.validation_seeds(32, 32)
    assert (
        len(val) == 32
        and set(val) <= set(CALIBRATION_SEEDS)
        and not set(val) & (set(calib) | set(score))
    )


def test_skip_configurations_are_chosen_on_calibration_errors_only():
    runs = [
        {"calib_nfe": 10, "calib_error": 0.2, "error": 0.01},
        {"calib_nfe": 10, "calib_error": 0.1, "error": 0.5},
        {"calib_nfe": 12, "calib_error": 0.01, "error": 0.001},
    ]
    chosen = skip_tradeoff.select(runs, budget=10)
    assert chosen["calib_error"] == 0.1  # the scored error plays no part, and the NFE budget holds


def test_calibrated_paths_are_chosen_on_validation_errors_within_the_budget():
    paths = [
        {"budget": 10, "nfe": 10, "calib_error": 0.01, "val_error": 0.3, "error": 0.001},
        {"budget": 10, "nfe": 10, "calib_error": 0.2, "val_error": 0.2, "error": 0.5},
        {"budget": 12, "nfe": 12, "calib_error": 0.3, "val_error": 0.1, "error": 0.4},
        {"budget": 15, "nfe": 15, "calib_error": 0.001, "val_error": 0.05, "error": 0.0001},
    ]
    assert (
        skip_tradeoff.choose_calibrated(paths, 10) is paths[1]
    )  # neither the fitted nor the scored error
    assert skip_tradeoff.choose_calibrated(paths, 14) is paths[2]  # a smaller budget's path may win
    assert skip_tradeoff.choose_calibrated(paths, 15) is paths[3]


def test_train_throughput_runs_the_training_step_and_counts_its_flops(tmp_path, monkeypatch):
    import json

    from benchmarks import train_throughput

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train_throughput.py",
            "--configs",
            "digits",
            "--batch",
            "4",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
        ],
    )
    train_throughput.main()
    (row,) = json.loads((tmp_path / "train_throughput_cpu_b4.json").read_text())["rows"]
    assert row["config"] == "digits" and row["batch"] == 4 and row["images_per_second"] > 0
    assert row["mfu"] is None  # no data-sheet peak for a CPU unless --peak-tflops gives one
    assert row["achieved_tflops"] == row["flops_per_step"] / row["seconds_per_step"] / 1e12
    import yaml

    from benchmarks.common import CONFIGS, config_module

    cfg = yaml.safe_load(open(CONFIGS / "digits.yaml"))["model"]
    module = config_module("digits")  # the config's network and loss, as train.py builds them
    assert (
        module.net.patch_size == cfg["net"]["init_args"]["patch_size"]
        and module.hparams.target == cfg["target"]
    )
    assert row["parameters"] == sum(p.numel() for p in module.net.parameters())


def test_step_cost_builds_each_config_network_as_the_config_says():
    import yaml

    from benchmarks import step_cost

    net, kw = step_cost.from_config("cifar10_p4")
    cfg = yaml.safe_load(open(step_cost.CONFIGS / "cifar10_p4.yaml"))["model"]["net"]["init_args"]
    assert (
        net.patch_size == cfg["patch_size"] == kw["patch_size"]
        and kw["image_size"] == cfg["image_size"]
    )
    assert list(net.config["channel_mult"]) == [float(m) for m in cfg["channel_mult"]]


def test_sample_throughput_compares_each_variant_with_fp32_on_the_same_noise(tmp_path, monkeypatch):
    import json

    from benchmarks import sample_throughput

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "sample_throughput.py",
            "--device",
            "cpu",
            "--tiny",
            "--models",
            "lsun_church_p4",
            "imagenet256_pair_cfg1.5",
            "--batch",
            "2",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--variants",
            "bf16",
            "--out",
            str(tmp_path),
        ],
    )
    sample_throughput.main()
    rows = json.loads((tmp_path / "sample_throughput_cpu_tiny.json").read_text())["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("lsun_church_p4", "fp32"),
        ("lsun_church_p4", "bf16"),
        ("imagenet256_pair_cfg1.5", "fp32"),
        ("imagenet256_pair_cfg1.5", "bf16"),
    ]
    fp32, bf16 = rows[0], rows[1]
    assert fp32["rms_vs_fp32"] == 0.0 and fp32["speedup_vs_fp32"] == 1.0
    assert (
        0.0 < bf16["rms_vs_fp32"] < 0.1 and bf16["images_per_second"] > 0
    )  # bf16 ran, and only rounded


def test_sampler_overhead_times_the_network_apart_from_the_sampler(tmp_path, monkeypatch):
    import json

    from benchmarks import sampler_overhead

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "sampler_overhead.py",
            "--device",
            "cpu",
            "--batch",
            "4",
            "--steps",
            "6",
            "--rounds",
            "1",
            "--out",
            str(tmp_path),
        ],
    )
    sampler_overhead.main()
    res = json.loads((tmp_path / "sampler_overhead_cpu.json").read_text())
    for r in res["settings"].values():
        assert 0 < r["network_seconds"] < r["wall_seconds"] and 0 < r["overhead_fraction"] < 1


@pytest.mark.slow  # ~2 min: every stage of the GPU script, tiny, on the CPU
def test_gpu_suite_runs_every_stage_in_smoke_mode(tmp_path):
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_suite.sh"), "--smoke"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:]
    log = (tmp_path / "gpu_suite" / "gpu_suite.log").read_text()
    assert log.count(": exit 0 after") == 4, log[-3000:]
    results = tmp_path / "gpu_suite"
    assert (results / "sample_throughput_cpu_tiny.json").exists()
    assert (results / "data_pipeline.json").exists()
    eager = json.loads((results / "train_throughput_cpu_b4.json").read_text())["rows"][0]
    fused = json.loads((results / "train_throughput_cpu_b4_fusednorm.json").read_text())["rows"][0]
    assert eager["flops_per_step"] == fused["flops_per_step"] > 0  # the same network and work
    assert eager["profile"]["share_by_kind"] and "copy_operators" in fused["profile"]


def test_calibration_holdout_scores_each_budget_against_the_best_plain_setting_on_held_out_seeds(
    tmp_path,
):
    from benchmarks.calibration_holdout import calibrate_here, holdout_rows, plot
    from benchmarks.common import CALIBRATION_SEEDS, SCORE_SEEDS, mixture_bench, rms
    from benchmarks.solver_accuracy import settings
    from pdm.calibration import calibrate_budgets
    from pdm.sampling import ScheduleFile

    bench = mixture_bench()
    calib = CALIBRATION_SEEDS[:8]
    # --mixture calibrates in the process, on the calibration seeds, as calibrate.py would
    made = calibrate_here(bench, [4], num_seeds=8, steps=12, halvings=1)
    paths = calibrate_budgets(
        bench.model_fn,
        bench.noise(calib),
        bench.schedule,
        [4],
        steps=12,
        halvings=1,
        prediction=bench.prediction,
        solver="ipndm",
        order=3,
    )
    assert made.schedules[4].settings.timesteps == paths[4].settings.timesteps
    assert made.calibrated_for["num_seeds"] == 8 and made.calibrated_for["seconds"] > 0
    rows = holdout_rows(bench, ScheduleFile(paths), SCORE_SEEDS[:6], label="times")
    label, nfe, _, _, held, plain, ratio = rows[0][:7]
    ref, _ = bench.reference(SCORE_SEEDS[:6])
    best = min(rms(bench.run(SCORE_SEEDS[:6], steps=4, **kw).x, ref) for _, _, kw in settings())
    assert nfe == 4 and float(plain.split()[0]) == float(f"{best:.3e}")
    assert (
        float(ratio) == pytest.approx(float(held) / float(plain.split()[0]), abs=0.01)
        and label == "times"
    )
    plot(rows, tmp_path / "holdout.png", "mixture")
    assert (tmp_path / "holdout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the trusted column: images whose references disagree by more than a tenth of the error
    # measured there (and by more than 1e-4) are left out; the best plain setting is chosen again
    from benchmarks.calibration_holdout import trusted_images

    errors = torch.tensor([1e-2, 1e-2, 2e-3, 1e-1, 5e-5, 1e-3])
    keep = trusted_images(torch.tensor([3e-4, 2e-3, 1.5e-4, 3e-2, 9e-5, 1.9e-4]), errors)
    assert keep.tolist() == [True, False, True, False, True, False]
    # references far apart against the median disagreement but far below the errors stay in
    assert trusted_images(
        torch.tensor([1e-5, 1e-5, 1e-5, 3.6e-4]), torch.tensor([1e-3, 1e-3, 1e-3, 0.1])
    ).all()
    x = bench.run(SCORE_SEEDS[:6], **paths[4].sample_kwargs()).x
    disagreement = torch.tensor(
        [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    )  # two images no error can be measured on
    keep = torch.tensor([True, True, False, True, True, False])
    both, ratio = holdout_rows(
        bench,
        ScheduleFile(paths),
        SCORE_SEEDS[:6],
        label="times",
        ref=ref,
        disagreement=disagreement,
    )[0][-2:]
    mine, plain_there = (float(v.split()[0]) for v in both.split(" / "))
    best_there = min(
        rms(bench.run(SCORE_SEEDS[:6], steps=4, **kw).x[keep], ref[keep]) for _, _, kw in settings()
    )
    assert mine == float(f"{rms(x[keep], ref[keep]):.2e}") and plain_there == float(
        f"{best_there:.2e}"
    )


def test_reference_disagreement_measures_the_reference_not_the_second_solver():
    """The per-image disagreement of the two references stands for the first one's own error
    (measured here against a 2,000-step solve): it must not understate it, nor be carried by a
    second solver much less accurate than the first (the 600-evaluation DPM-Solver-3 used before
    was 19-41x off on these seeds and made the trusted column leave out hard, well-posed images)."""
    from benchmarks.common import mixture_bench, per_image_rms

    bench = mixture_bench()
    for seeds in (SCORE_SEEDS[:16], SCORE_SEEDS[100:116]):
        truth = bench.run(seeds, steps=2000, solver="unipc", order=3, skip_type="logSNR").x
        ref, disagreement = bench.reference_per_image(seeds)
        own = per_image_rms(ref, truth)
        assert disagreement.pow(2).mean().sqrt() >= 0.5 * own.pow(2).mean().sqrt()
        assert disagreement.max() <= 10 * own.max()


def test_kernel_kinds_sort_the_h200_profiles_kernels():
    # names as the H200 profile of the compiled LSUN step printed them (benchmarks/RESULTS.md)
    from benchmarks.train_throughput import kernel_kind

    assert (
        kernel_kind(
            "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64"
        )
        == "convolution"
    )
    assert (
        kernel_kind(
            "triton_red_fused__to_copy_clone_mul_native_group_norm_native_group_norm_backward_silu"
        )
        == "norm+activation"
    )
    assert (
        kernel_kind(
            "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
            "direct_copy_kernel_cuda"
        )
        == "copy/layout"
    )
    assert kernel_kind("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64") == "attention"
    assert (
        kernel_kind(
            "void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata, FusedAdam"
        )
        == "optimizer+EMA"
    )
    assert kernel_kind("triton_poi_fused_add_mul_3") == "fused pointwise/reduction"


def test_calibration_holdout_adds_fd_and_accuracy_of_samples_per_budget(tiny_ckpts):
    # --fd-samples: FD-8x8/floor and classifier accuracy for the path and the best plain setting
    from benchmarks.calibration_holdout import holdout_rows
    from benchmarks.common import CALIBRATION_SEEDS, SCORE_SEEDS, digits_bench
    from pdm.calibration import calibrate_budgets
    from pdm.sampling import ScheduleFile

    bench = digits_bench(tiny_ckpts["cond"])
    calib = CALIBRATION_SEEDS[:4]
    paths = calibrate_budgets(
        bench.model_fn,
        bench.noise(calib),
        bench.schedule,
        [3],
        steps=6,
        halvings=0,
        refine_sweeps=1,
        continuous=False,
        prediction=bench.prediction,
        model_kwargs=bench.kwargs(calib),
        solver="ipndm",
        order=3,
    )
    rows = holdout_rows(bench, ScheduleFile(paths), SCORE_SEEDS[:4], label="times", fd_samples=40)
    fd, accuracy = rows[0][-2:]
    mine, plain = (float(v) for v in fd.split(" / "))
    assert mine > 0 and plain > 0
    assert all(0.0 <= float(v) <= 1.0 for v in accuracy.split(" / "))


def test_carried_errors_say_in_which_step_a_sampler_made_its_error(capsys):
    # --worst: each step's state solved accurately to the end; checked against DDIM stopped early
    from benchmarks.calibration_holdout import carried_errors, worst_images
    from benchmarks.common import SCORE_SEEDS, mixture_bench, per_image_rms
    from pdm.sampling import LearnedSchedule, ScheduleFile, Settings, sample

    bench, seeds = mixture_bench(), SCORE_SEEDS[:5]
    ref, disagreement = bench.reference_per_image(seeds)
    kw = dict(steps=4, solver="dpmsolver", order=1, skip_type="time_uniform")
    times, carried = carried_errors(bench, seeds, ref, kw)
    grid = bench.schedule.timesteps(4, "time_uniform").tolist()
    assert times == pytest.approx(grid[:-1] + [0.0]) and carried.shape == (5, 5)
    assert torch.all(carried[:, 0] == 0)  # nothing made before the first step
    assert torch.allclose(carried[:, -1], per_image_rms(bench.run(seeds, **kw).x, ref))
    two = bench.run(
        seeds,
        steps=2,
        solver="dpmsolver",
        order=1,
        timesteps=torch.tensor(grid[:3], dtype=torch.float64),
    ).x
    end = sample(
        bench.model_fn,
        two,
        bench.schedule,
        steps=200,
        solver="unipc",
        order=3,
        skip_type="logSNR",
        prediction=bench.prediction,
        t_start=grid[2],
    ).x
    assert torch.allclose(carried[:, 2], per_image_rms(end, ref), rtol=1e-6, atol=1e-12)
    path = LearnedSchedule(Settings(steps=4, solver="ipndm", order=3, grid="logSNR"))
    cache = {4: {"best": ("DDIM time_uniform", kw, torch.zeros(5))}}
    worst_images(bench, ScheduleFile({4: path}), "ipndm", seeds, ref, disagreement, cache, k=2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 3
        and "ipndm, 4 NFE" in lines[0]
        and all("references differ by" in line for line in lines[1:])
    )
    errors = per_image_rms(
        bench.run(seeds, steps=4, solver="ipndm", order=3, skip_type="logSNR").x, ref
    )
    assert lines[1].split(":")[0].strip() == f"seed {seeds[int(errors.argmax())]}"


def test_calibration_holdout_scores_several_blocks_each_on_its_own(capsys, tmp_path):
    # --blocks: each block of seeds gets its own reference and best plain setting, and the ratio
    # per block with its median is printed: one block of 200 can be decided by one image
    import argparse

    from benchmarks.calibration_holdout import holdout_rows, score_blocks
    from benchmarks.common import SCORE_SEEDS, mixture_bench
    from pdm.sampling import LearnedSchedule, ScheduleFile, Settings

    bench = mixture_bench()
    paths = ScheduleFile(
        {4: LearnedSchedule(Settings(steps=4, solver="ipndm", order=3, grid="logSNR"))}
    )
    args = argparse.Namespace(blocks=2, seeds=3, first_seed=30, fd_samples=0, worst=0)
    rows = score_blocks(bench, [("ipndm", paths)], args)
    assert [r[0] for r in rows] == ["ipndm [seeds 30-32]", "ipndm [seeds 33-35]"]
    for row, first in zip(rows, (30, 33)):  # the same as scoring that block alone
        alone = holdout_rows(bench, paths, SCORE_SEEDS[first : first + 3], "ipndm")[0]
        assert row[4:7] == alone[4:7]
    err = capsys.readouterr().err
    assert f"ratio to the best plain setting per block {rows[0][6]}, {rows[1][6]}; median" in err
    from benchmarks.calibration_holdout import plot_blocks

    plot_blocks(rows, ["ipndm"], tmp_path / "blocks.png", "mixture")
    assert (tmp_path / "blocks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_image_benchmark_scores_every_method_on_held_out_seeds(monkeypatch, tmp_path):
    import benchmarks.per_image as bench_module
    from benchmarks.common import SCORE_SEEDS, mixture_bench, per_image_rms

    monkeypatch.setattr(bench_module, "PLAIN_NFES", (10, 12))
    monkeypatch.setattr(bench_module, "SCALES", (1.0, 0.3, 0.1))
    monkeypatch.setattr(bench_module, "_learned", lambda bench, schedule_file: {})
    bench, seeds = mixture_bench(), list(SCORE_SEEDS[:6])
    ref, _ = bench.reference(seeds)
    result = bench_module.curves(bench, seeds, ref, 3, None)
    assert set(result) == {"best plain", *bench_module.SHARED, *bench_module.PER_IMAGE}
    per_image = result["per-image DPM-Solver-12"][0]
    x = bench.run(
        seeds, solver="dpmsolver++", order=2, method="per_image"
    )  # batches of 3: per-image needs none
    assert per_image["rms"] == pytest.approx(float(per_image_rms(x.x, ref).pow(2).mean().sqrt()))
    assert per_image["median"] <= per_image["p90"] <= per_image["p99"] <= per_image["max"]
    shared = result["batch-shared DPM-Solver-12"][0]
    assert shared["nfe_max"] >= per_image["nfe_max"] or shared["nfe"] > per_image["nfe"]
    rows = bench_module.at_equal_nfe(result)
    assert all(10 <= float(r[2]) <= 30 for r in rows)
    bench_module.plot({"mixture": result}, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_pipeline_times_every_way_on_generated_datasets(tmp_path):
    from benchmarks import data_pipeline

    rows = data_pipeline.main(
        ["--images", "4", "--repeats", "1", "--root", str(tmp_path / "data")]
        + ["--out", str(tmp_path)]
    )
    ways = {(r["kind"], r["way"]) for r in rows}
    for kind in ("folder", "folder64", "lmdb", "hf"):
        assert {(kind, "pdm"), (kind, "torchvision decode"), (kind, "torchvision resize")} <= ways
    assert ("folder64", "PIL draft") in ways and ("lmdb", "PIL draft") not in ways
    assert all(r["images_per_second"] > 0 for r in rows)
    by = {(r["kind"], r["way"]): r for r in rows}
    assert by[("hf", "torchvision decode")]["max_diff"] == 0  # PNG is lossless: the same pixels
    for kind in ("folder", "lmdb"):  # the same decoder family: at most one step of rounding
        assert by[(kind, "torchvision decode")]["max_diff"] <= 1
    # the reduced-scale JPEG decode changes pixels at 64 (that is its point), but not grossly
    assert 0 < by[("folder64", "PIL draft")]["mean_diff"] < 8
    assert (tmp_path / "data_pipeline.json").exists()
