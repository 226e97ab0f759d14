"""calibrate.py: a calibrated path for a checkpoint, written once, replayed by sample.py."""

import json

import numpy as np
import pytest

import calibrate as calibrate_cli
import sample as sample_cli
from pdm.sampling import SkipPath


def test_calibrated_path_is_written_and_replayed_by_sample(tiny_ckpts, tmp_path):
    out = tmp_path / "path.json"
    summary = calibrate_cli.main(["--ckpt", tiny_ckpts["cond"], "--nfe", "4", "--steps", "12", "--num-seeds", "4",
                                  "--screen", "32", "--out", str(out), "--device", "cpu"])
    path = SkipPath.load(out)
    # the default search frees the kept times from the fine grid: a 4-step grid of its own
    times = path.settings["timesteps"]
    assert path.nfe == 4 == summary["nfe"] and path.evaluate == (True,) * 4 and summary["timesteps"] == times
    assert len(times) == 5 and all(a > b for a, b in zip(times, times[1:]))
    assert path.settings["solver"] == "ipndm" and path.settings["steps"] == 4
    # the cost in network evaluations of one image: at least the accurate solution of 4 images
    # on the 12-step grid, and the screening of 32 candidates besides
    assert summary["image_evaluations"] > 12 * 4 + 32 and summary["image_evaluations_per_image"] == round(
        summary["image_evaluations"] / 4, 1)
    made = path.settings["calibrated_for"]
    assert made["seed"] == 1_000_000 and len(made["checkpoints"]) == 1 and made["coefficients"] is False
    # 32 candidates were screened; the file names the images drawn and the hard ones
    assert made["screened"] == 32 and len(made["images"]) == 4 == len(set(made["images"]))
    assert len(made["hard_images"]) == 1 and set(made["hard_images"]) <= set(made["images"])
    stats = sample_cli.main(["--ckpt", tiny_ckpts["cond"], "--num-samples", "3", "--skip-path", str(out),
                             "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert stats["nfe"] == 4
    ident = json.loads((tmp_path / "s" / "run.json").read_text())["identity"]["settings"]
    assert ident["steps"] == 4 and ident["solver"] == "ipndm" and ident["order"] == 3 and ident["timesteps"] == times
    assert ident["skip_type"] is None
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape[0] == 3
    with pytest.raises(SystemExit):  # the path fixes its own grid
        sample_cli.main(["--ckpt", tiny_ckpts["cond"], "--num-samples", "3", "--skip-path", str(out), "--skip-type",
                         "logSNR", "--out", str(tmp_path / "s2"), "--device", "cpu"])
    assert not (tmp_path / "s2").exists()


def test_grid_points_only_keeps_evaluations_on_the_fine_grid(tiny_ckpts, tmp_path):
    out = tmp_path / "path.json"
    summary = calibrate_cli.main(["--ckpt", tiny_ckpts["cond"], "--nfe", "4", "--steps", "12", "--num-seeds", "4",
                                  "--out", str(out), "--device", "cpu", "--grid-points-only"])
    path = SkipPath.load(out)
    assert path.nfe == 4 and len(path.evaluate) == 12 and path.evaluate[0] and "timesteps" not in path.settings
    assert summary["kept"] == [i for i, e in enumerate(path.evaluate) if e] and path.settings["steps"] == 12
    stats = sample_cli.main(["--ckpt", tiny_ckpts["cond"], "--num-samples", "3", "--skip-path", str(out),
                             "--out", str(tmp_path / "s"), "--device", "cpu"])
    ident = json.loads((tmp_path / "s" / "run.json").read_text())["identity"]["settings"]
    assert stats["nfe"] == 4 and ident["steps"] == 12 and ident["skip_type"] == "logSNR"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nfe", "0"], "--nfe must be in 1..--steps"),
        (["--nfe", "200"], "--nfe must be in 1..--steps"),
        (["--nfe", "5", "--seed", "-1"], "--seed must be in"),
        (["--nfe", "5", "--screen", "3"], "--screen (3) must be at least --num-seeds (32)"),
        (["--nfe", "5", "--hard-fraction", "1"], "--hard-fraction must be in [0, 1)"),
        (["--nfe", "5", "--guidance-scale", "nan"], "finite"),
        (["--nfe", "5", "--out", "@existing"], "exists; pass --overwrite"),
        (["--nfe", "5", "--out", "@dir/p.txt"], "should name a .json file"),
        (["--nfe", "5", "--out", "@dir/missing/p.json"], "does not exist"),
        (["--nfe", "5", "--solver-type", "bh1"], "--order and --solver-type need a named --solver"),
        (["--nfe", "5", "--order", "2"], "--order and --solver-type need a named --solver"),
        (["--nfe", "5", "--solver", "ipndm", "--solver-type", "bh1"], "--solver-type does nothing with --solver ipndm"),
        (["--nfe", "5", "--solver", "unipc", "--solver-type", "taylor"], "solver_type"),
        (["--nfe", "5", "--precision", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
    ],
)
def test_bad_flags_exit_2_with_one_line_before_any_work(tiny_ckpts, tmp_path, capsys, extra, message):
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    extra = [str(existing) if a == "@existing" else a.replace("@dir", str(tmp_path)) for a in extra]
    if "--out" not in extra:
        extra += ["--out", str(tmp_path / "new.json")]
    with pytest.raises(SystemExit) as e:
        calibrate_cli.main(["--ckpt", tiny_ckpts["cond"], *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]
    assert existing.read_text() == "{}"


def test_solver_type_is_calibrated_and_recorded_for_the_replay(tiny_ckpts, tmp_path):
    out = tmp_path / "path.json"
    calibrate_cli.main(["--ckpt", tiny_ckpts["cond"], "--nfe", "3", "--steps", "8", "--num-seeds", "2", "--out", str(out),
                        "--device", "cpu", "--solver", "unipc", "--solver-type", "bh1", "--grid-points-only"])
    path = SkipPath.load(out)
    assert path.settings["solver"] == "unipc" and path.settings["solver_type"] == "bh1"
    assert path.sample_kwargs()["solver_type"] == "bh1"


def test_auto_solver_calibrates_ipndm_below_16_nfe_and_unipc_bh1_from_16(tiny_ckpts, tmp_path):
    from pdm.sampling.budgets import PathFile

    out = tmp_path / "paths.json"
    calibrate_cli.main(["--ckpt", tiny_ckpts["cond"], "--nfe", "3", "16", "--steps", "20", "--num-seeds", "2", "--validation-fraction", "0",
                        "--out", str(out), "--device", "cpu", "--time-search", "warp"])
    paths = PathFile.load(out)
    low, high = paths.select(3).settings, paths.select(16).settings
    assert (low["solver"], low["order"]) == ("ipndm", 3)
    assert (high["solver"], high["order"], high["solver_type"]) == ("unipc", 3, "bh1")
    assert paths.calibrated_for["solver"] == "auto" and paths.calibrated_for["time_search"] == "warp"
    # the warp spends its evaluations on its own grid of N steps, as the free search does
    assert len(high["timesteps"]) == 17 and high["steps"] == 16
