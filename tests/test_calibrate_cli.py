"""calibrate.py: a learned schedule for a checkpoint, written once, replayed by sample.py."""

import json

import numpy as np
import pytest

import calibrate as calibrate_cli
import sample as sample_cli
from pdm.sampling import LearnedSchedule


def test_the_schedule_is_written_and_replayed_by_sample(tiny_ckpts, tmp_path, capsys):
    out = tmp_path / "schedule.json"
    summary = calibrate_cli.main(
        [
            "--ckpt",
            tiny_ckpts["cond"],
            "--nfe",
            "4",
            "--steps",
            "12",
            "--num-seeds",
            "4",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    learned = LearnedSchedule.load(out)
    # the search frees the times from the fine grid: a 4-step grid of its own
    times = list(learned.settings.timesteps)
    assert (
        learned.nfe == 4 == summary["nfe"]
        and learned.grid_points is None
        and summary["timesteps"] == times
    )
    assert len(times) == 5 and all(a > b for a, b in zip(times, times[1:]))
    assert learned.settings.solver == "ipndm" and learned.settings.steps == 4
    # the cost in network evaluations of one image: at least the accurate solution of 4 images on the 12-step grid
    assert summary["image_evaluations"] > 12 * 4 and summary[
        "image_evaluations_per_image"
    ] == round(summary["image_evaluations"] / 4, 1)
    made = learned.calibrated_for
    assert (
        made["seed"] == 1_000_000
        and len(made["checkpoints"]) == 1
        and made["coefficients"] is False
    )
    assert made["num_seeds"] == 4 and made["steps"] == 12
    stats = sample_cli.main(
        [
            "--ckpt",
            tiny_ckpts["cond"],
            "--num-samples",
            "3",
            "--schedule",
            str(out),
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
        ]
    )
    assert stats["nfe"] == 4
    ident = json.loads((tmp_path / "s" / "run.json").read_text())["identity"]["settings"]
    assert (
        ident["steps"] == 4
        and ident["solver"] == "ipndm"
        and ident["order"] == 3
        and ident["timesteps"] == times
    )
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape[0] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the schedule fixes its own grid
        sample_cli.main(
            [
                "--ckpt",
                tiny_ckpts["cond"],
                "--num-samples",
                "3",
                "--schedule",
                str(out),
                "--grid",
                "logSNR",
                "--out",
                str(tmp_path / "s2"),
                "--device",
                "cpu",
            ]
        )
    assert "carries its own time grid; drop --grid" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()
    # the old flag still replays it, and says it is the old name
    stats = sample_cli.main(
        [
            "--ckpt",
            tiny_ckpts["cond"],
            "--num-samples",
            "3",
            "--skip-path",
            str(out),
            "--out",
            str(tmp_path / "s3"),
            "--device",
            "cpu",
        ]
    )
    assert (
        stats["nfe"] == 4 and "--skip-path is the old name of --schedule" in capsys.readouterr().err
    )
    assert (tmp_path / "s3" / "samples.npz").read_bytes() == (
        tmp_path / "s" / "samples.npz"
    ).read_bytes()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nfe", "0"], "--nfe must be in 1..--steps"),
        (["--nfe", "200"], "--nfe must be in 1..--steps"),
        (["--nfe", "5", "--seed", "-1"], "--seed must be in"),
        (["--nfe", "5", "--guidance-scale", "nan"], "finite"),
        (["--nfe", "5", "--out", "@existing"], "exists; pass --overwrite"),
        (["--nfe", "5", "--out", "@dir/p.txt"], "should name a .json file"),
        (["--nfe", "5", "--out", "@dir/missing/p.json"], "does not exist"),
        (["--nfe", "5", "--solver", "heun"], "is not auto or NAME[-ORDER[-VARIANT]]"),
        (["--nfe", "5", "--solver", "ddpm"], "of a deterministic solver"),
        (["--nfe", "5", "--solver", "ipndm-x"], "the order must be a number"),
        (["--nfe", "5", "--solver", "ipndm-3-bh1"], "ipndm has no variants; drop -bh1"),
        (["--nfe", "5", "--solver", "unipc-3-taylor"], "solver_type"),
        (["--nfe", "5", "--solver", "unipc-7"], "order must be"),
        (
            ["--nfe", "5", "--teleport-data", "no/such.yaml"],
            "does not exist; name the training config",
        ),
        (["--nfe", "5", "--precision", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
    ],
)
def test_bad_flags_exit_2_with_one_line_before_any_work(
    tiny_ckpts, tmp_path, capsys, extra, message
):
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


def test_a_named_solver_with_its_order_and_variant_is_calibrated_and_recorded(tiny_ckpts, tmp_path):
    out = tmp_path / "schedule.json"
    calibrate_cli.main(
        [
            "--ckpt",
            tiny_ckpts["cond"],
            "--nfe",
            "3",
            "--steps",
            "8",
            "--num-seeds",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--solver",
            "unipc-3-bh1",
        ]
    )
    learned = LearnedSchedule.load(out)
    assert (learned.settings.solver, learned.settings.order, learned.settings.variant) == (
        "unipc",
        3,
        "bh1",
    )
    assert learned.sample_kwargs()["solver_type"] == "bh1"


def test_auto_solver_calibrates_ipndm_below_16_nfe_and_unipc_bh1_from_16():
    # what --solver auto hands the calibration per budget (test_budgets.py runs it through one)
    solver_for, first = calibrate_cli.solver_settings("auto", [3, 16], 20)
    assert first == solver_for(3) == {"solver": "ipndm", "order": 3, "solver_type": None}
    assert solver_for(15)["solver"] == "ipndm" and solver_for(16) == {
        "solver": "unipc",
        "order": 3,
        "solver_type": "bh1",
    }
    assert calibrate_cli.solver_settings("deis", [5], 20) == (None, {"solver": "deis", "order": 3})
