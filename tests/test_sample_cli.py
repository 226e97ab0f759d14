"""sample.py: outputs, seed-per-image determinism, shards and resume, experts, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, run_main  # noqa: E402

import sample as sample_cli


def run_cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_writes_grid_samples_and_stats(tiny_ckpts, tmp_path):
    stats = sample_cli.main(
        [
            "--ckpt",
            tiny_ckpts["cond"],
            "--num-samples",
            "6",
            "--steps",
            "5",
            "--out",
            str(tmp_path),
            "--guidance-scale",
            "1.5",
            "--labels",
            "3",
            "7",
        ]
    )
    npz = np.load(tmp_path / "samples.npz")
    assert npz["arr_0"].shape == (6, 16, 16, 1) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [3, 7, 3, 7, 3, 7]
    assert (tmp_path / "grid.png").stat().st_size > 0
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["nfe"] == 5 and saved["images_per_second"] > 0 and saved["seconds"] > 0
    ident = saved["run"]["identity"]["settings"]
    assert (ident["solver"], ident["order"], ident["grid"]) == ("ipndm", 4, "logSNR") and stats[
        "num_samples"
    ] == 6
    assert json.loads((tmp_path / "run.json").read_text())["identity"]["num_samples"] == 6


def test_images_do_not_depend_on_batch_size_or_shards(tiny_ckpts, tmp_path):
    common = ["--ckpt", tiny_ckpts["cond"], "--num-samples", "7", "--steps", "4"]
    sample_cli.main(common + ["--out", str(tmp_path / "a"), "--batch-size", "7"])
    sample_cli.main(
        common + ["--out", str(tmp_path / "b"), "--batch-size", "2", "--shard-size", "3"]
    )
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_killed_sharded_run_resumes_to_identical_images(tiny_ckpts, tmp_path):
    args = [
        "--ckpt",
        tiny_ckpts["uncond"],
        "--num-samples",
        "24",
        "--steps",
        "8",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
    ]
    full = run_cli(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "shards" / "shard_00001.npz").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(os.listdir(out / "shards"))
    assert "shard_00001.npz" in done_before and not (out / "samples.npz").exists()
    resumed = run_cli(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images_sampled_this_run"] < 24  # finished shards were not redone
    assert (out / "samples.npz").read_bytes() == (tmp_path / "full" / "samples.npz").read_bytes()


def test_two_experts_sample_and_report_nfe(tiny_ckpts, tmp_path):
    stats = sample_cli.main(
        [
            "--ckpt",
            tiny_ckpts["low"],
            "--ckpt",
            tiny_ckpts["high"],
            "--num-samples",
            "3",
            "--steps",
            "6",
            "--out",
            str(tmp_path),
        ]
    )
    assert stats["nfe"] == 6 and np.load(tmp_path / "samples.npz")["arr_0"].shape[0] == 3


def test_adaptive_skipping_flags_report_the_evaluated_mask(tiny_ckpts, tmp_path):
    stats = sample_cli.main(
        [
            "--ckpt",
            tiny_ckpts["uncond"],
            "--num-samples",
            "2",
            "--steps",
            "20",
            "--out",
            str(tmp_path),
            "--skip-threshold",
            "1e9",
            "--max-skips",
            "2",
        ]
    )
    assert len(stats["evaluated"]) == 2 and len(stats["evaluated"][0]) == 20
    assert stats["nfe"] == sum(stats["evaluated"][0]) < 20


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ckpt", "does/not/exist.ckpt"], "does not exist"),
        (["--ckpt", "@uncond", "--guidance-scale", "2"], "unconditional"),
        (["--ckpt", "@cond", "--labels", "12"], "out of range"),
        (["--ckpt", "@high"], "partner"),
        (["--ckpt", "@high", "--ckpt", "@low_gap"], "do not meet"),
        (["--ckpt", "@notckpt"], "not a readable PyTorch checkpoint"),
        (
            [
                "--ckpt",
                "@cond",
                "--solver",
                "dpmsolver++",
                "--method",
                "singlestep_fixed",
                "--order",
                "3",
                "--steps",
                "2",
            ],
            "needs at least 3 steps",
        ),
        (
            ["--ckpt", "@cond", "--solver", "dpmsolver++", "--order", "4"],
            "order must be 1, 2 or 3 for dpmsolver++",
        ),
        (["--ckpt", "@ckdir"], "is a folder"),
        (["--ckpt", "@cond", "--out", "@file/sub"], "cannot write to output folder"),
    ],
)
def test_bad_input_exits_2_with_a_one_line_message(tiny_ckpts, tmp_path, capsys, extra, message):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("hello")
    paths = {
        **tiny_ckpts,
        "notckpt": str(junk),
        "file/sub": str(junk / "sub"),
        "ckdir": str(tmp_path),
    }
    args = [paths[a[1:]] if a.startswith("@") else a for a in extra]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "o")]
    if "--steps" not in args:
        args += ["--steps", "2"]
    code, err = _run_in_process([*args, "--num-samples", "1"], capsys)
    assert code == 2 and 1 <= len(err) <= 3 and message in err[-1], err


def test_dpm_solver_methods_take_dpm_solver_without_being_told(tiny_ckpts, tmp_path, capsys):
    # --method per_image (or singlestep, adaptive) is DPM-Solver's: it needs no --solver
    args = ["--ckpt", tiny_ckpts["cond"], "--method", "singlestep", "--steps", "3"]
    code, err = _run_in_process([*args, "--num-samples", "2", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["identity"]["settings"]["solver"] == "dpmsolver++"


def test_a_finished_run_is_extended_and_its_first_images_do_not_change(
    tiny_ckpts, tmp_path, capsys
):
    common = ["--ckpt", tiny_ckpts["cond"], "--steps", "3", "--batch-size", "2"]
    out = tmp_path / "out"
    assert _run_in_process([*common, "--num-samples", "5", "--out", out], capsys)[0] == 0
    first = np.load(out / "samples.npz")["arr_0"]
    assert json.loads((out / "run.json").read_text())["identity"]["shard_size"] == 2  # one batch
    code, err = _run_in_process([*common, "--num-samples", "9", "--out", out], capsys)
    assert code == 0 and any("extending" in line for line in err), err
    more = np.load(out / "samples.npz")["arr_0"]
    assert len(more) == 9 and np.array_equal(more[:5], first)
    fresh = tmp_path / "fresh"
    assert _run_in_process([*common, "--num-samples", "9", "--out", fresh], capsys)[0] == 0
    assert (fresh / "samples.npz").read_bytes() == (out / "samples.npz").read_bytes()


# --- one run per output folder (issue: outputs overwritten, mixed or stale) ----------------------------

BASE = ["--num-samples", "5", "--steps", "3", "--shard-size", "2", "--batch-size", "2"]


def _run_in_process(args, capsys):
    """sample.py's main in this process: (exit code, stderr lines)."""
    return run_main(sample_cli, args, capsys)


@pytest.mark.parametrize(
    "change",
    [
        ["--solver", "unipc"],
        ["--steps", "4"],
        ["--guidance-scale", "2"],
        ["--labels", "1"],
        ["--seed", "1"],
        ["--num-samples", "4"],  # fewer: more would extend the run
        ["--shard-size", "3"],
        ["@other_ckpt"],
    ],
)
def test_rerun_with_other_settings_refuses_and_overwrite_equals_a_fresh_run(
    tiny_ckpts, tmp_path, capsys, change
):
    first = ["--ckpt", tiny_ckpts["cond"], *BASE, "--out", tmp_path / "out"]
    assert _run_in_process(first, capsys)[0] == 0
    before = (tmp_path / "out" / "samples.npz").read_bytes()
    if change == ["@other_ckpt"]:
        changed = [
            "--ckpt",
            tiny_ckpts["low"],
            "--ckpt",
            tiny_ckpts["high"],
            *BASE,
            "--out",
            tmp_path / "out",
        ]
    else:
        changed = _replace(first, change)
    code, err = _run_in_process(changed, capsys)
    assert code == 2 and len(err) <= 3 and "other settings" in err[-1] and "--overwrite" in err[-1]
    assert (tmp_path / "out" / "samples.npz").read_bytes() == before  # nothing touched
    assert _run_in_process(changed + ["--overwrite"], capsys)[0] == 0
    fresh = _replace(changed, ["--out", tmp_path / "fresh"])
    assert _run_in_process(fresh, capsys)[0] == 0
    assert (tmp_path / "out" / "samples.npz").read_bytes() == (
        tmp_path / "fresh" / "samples.npz"
    ).read_bytes()


def _replace(args, change):
    """args with the flag of ``change`` set to its value (added when absent)."""
    args = list(args)
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def test_rerun_with_the_same_settings_resumes_byte_identically(tiny_ckpts, tmp_path, capsys):
    args = ["--ckpt", tiny_ckpts["cond"], *BASE, "--out", tmp_path / "out"]
    assert _run_in_process(args, capsys)[0] == 0
    before = (tmp_path / "out" / "samples.npz").read_bytes()
    stats = sample_cli.main(
        [str(a) for a in args + ["--batch-size", "5"]]
    )  # another batch size changes nothing
    assert stats["images_sampled_this_run"] == 0
    assert (tmp_path / "out" / "samples.npz").read_bytes() == before


def test_shards_split_over_two_invocations_merge_to_the_one_run_result(
    tiny_ckpts, tmp_path, capsys
):
    common = ["--ckpt", tiny_ckpts["cond"], *BASE]
    assert _run_in_process(common + ["--out", tmp_path / "whole"], capsys)[0] == 0
    for i in (0, 1):
        part = sample_cli.main(
            [
                str(a)
                for a in common
                + ["--out", tmp_path / f"part{i}", "--num-shards", "2", "--shard-index", str(i)]
            ]
        )
        assert part["shards_missing"] > 0 and not (tmp_path / f"part{i}" / "samples.npz").exists()
    assert (
        _run_in_process(
            ["--merge", tmp_path / "part0", tmp_path / "part1", "--out", tmp_path / "merged"],
            capsys,
        )[0]
        == 0
    )
    assert (tmp_path / "merged" / "samples.npz").read_bytes() == (
        tmp_path / "whole" / "samples.npz"
    ).read_bytes()
    # parts of different runs do not merge
    assert (
        _run_in_process(
            common
            + [
                "--seed",
                "7",
                "--out",
                tmp_path / "other",
                "--num-shards",
                "2",
                "--shard-index",
                "1",
            ],
            capsys,
        )[0]
        == 0
    )
    code, err = _run_in_process(
        ["--merge", tmp_path / "part0", tmp_path / "other", "--out", tmp_path / "bad"], capsys
    )
    assert code == 2 and "different settings" in err[-1]
    code, err = _run_in_process(["--merge", tmp_path / "part0", "--out", tmp_path / "bad2"], capsys)
    assert code == 2 and "missing" in err[-1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance-scale", "nan"], "finite"),
        (["--guidance-scale", "inf"], "finite"),
        (["--skip-threshold", "nan"], "finite"),
        (["--out", ""], "--out is empty"),
        (["--seed", str(2**32)], "--seed must be in"),
        (["--device", "banana"], "not a device"),
        (["--solver", "ddim", "--order", "2"], "--order does nothing"),
        (["--max-skips", "3"], "does nothing without --skip-threshold"),
        (["--solver", "ddim", "--solver-type", "taylor"], "--variant/--solver-type does nothing"),
        (["--num-shards", "2", "--shard-index", "2"], "--shard-index must be in"),
        (["--schedule", "no/such/path.json"], "does not exist"),
    ],
)
def test_bad_flags_exit_2_with_one_line_before_any_work(
    tiny_ckpts, tmp_path, capsys, extra, message
):
    args = ["--ckpt", tiny_ckpts["cond"], "--num-samples", "1", "--steps", "4"]
    if "--out" not in extra:
        args += ["--out", tmp_path / "o"]
    code, err = _run_in_process(args + extra, capsys)
    assert code == 2 and 1 <= len(err) <= 3 and message in err[-1], err
    assert not (tmp_path / "o" / "shards").exists() or not any(
        (tmp_path / "o" / "shards").iterdir()
    )


def test_cuda_without_a_gpu_is_a_clear_error(tiny_ckpts, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so --device cuda is valid here")
    code, err = _run_in_process(
        ["--ckpt", tiny_ckpts["cond"], "--out", tmp_path / "o", "--device", "cuda"], capsys
    )
    assert code == 2 and "no CUDA GPU" in err[-1]


def test_ctrl_c_keeps_finished_shards_and_exits_130_saying_what_was_kept(tiny_ckpts, tmp_path):
    out = tmp_path / "o"
    args = [
        "--ckpt",
        tiny_ckpts["uncond"],
        "--num-samples",
        "400",
        "--steps",
        "50",
        "--batch-size",
        "2",
        "--shard-size",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "sample.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "shards" / "shard_00001.npz").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if not line.startswith("images ")]
    assert (
        proc.returncode == 130
        and "Traceback" not in err
        and len(lines) <= 3
        and "interrupted" in lines[-1]
    ), err
    kept = sorted(os.listdir(out / "shards"))
    finished = [k for k in kept if k.endswith(".npz") and f"{k}.sha256" in kept]
    assert "shard_00001.npz" in kept and all(
        np.load(out / "shards" / k)["images"].shape[0] == 2 for k in finished
    )
    # the message counts what is there: "<n> of 200 shards are finished in <out> (<n> made by this run)"
    assert (
        f"{len(finished)} of 200 shards are finished in {out} ({len(finished)} made by this run)"
        in lines[-1]
    ), err


def test_ctrl_c_before_the_first_shard_says_nothing_was_kept(
    tiny_ckpts, tmp_path, monkeypatch, capsys
):
    import pdm.outputs.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pdm.outputs.run, "make_shard", interrupted)
    out = tmp_path / "o"
    code, err = _run_in_process(
        ["--ckpt", tiny_ckpts["uncond"], "--num-samples", "4", "--steps", "2", "--out", out], capsys
    )
    assert code == 130 and len(err) == 1 and f"no images kept in {out}" in err[0], err
    monkeypatch.setattr(sample_cli, "check_flags", interrupted)  # before anything is loaded
    code, err = _run_in_process(["--ckpt", tiny_ckpts["uncond"], "--out", tmp_path / "p"], capsys)
    assert code == 130 and "nothing was written" in err[0] and not (tmp_path / "p").exists(), err


def test_ctrl_c_swallowed_by_a_finalizer_still_stops_at_the_next_batch(
    tiny_ckpts, tmp_path, monkeypatch, capsys
):
    # Python ignores an exception raised inside __del__; the interrupt must not be lost with it.
    import pdm.outputs.run

    class RaisesOnDelete:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    real, calls = pdm.outputs.run.to_uint8, []

    def to_uint8(x):
        calls.append(1)
        if len(calls) == 1:
            obj = RaisesOnDelete()
            del obj  # the handler runs inside __del__, where the KeyboardInterrupt is swallowed
        return real(x)

    monkeypatch.setattr(pdm.outputs.run, "to_uint8", to_uint8)
    out = tmp_path / "o"
    before = signal.getsignal(
        signal.SIGINT
    )  # SIG_IGN, not Python's handler, under a shell's background job
    with pytest.raises(SystemExit) as e:
        sample_cli.main(
            [
                "--ckpt",
                tiny_ckpts["uncond"],
                "--num-samples",
                "8",
                "--steps",
                "3",
                "--batch-size",
                "2",
                "--shard-size",
                "2",
                "--out",
                str(out),
            ]
        )
    assert e.value.code == 130 and "1 of 4 shards are finished" in capsys.readouterr().err
    assert (
        sorted(os.listdir(out / "shards")) == ["shard_00000.npz", "shard_00000.npz.sha256"]
        and len(calls) == 1
    )
    assert signal.getsignal(signal.SIGINT) is before  # the CLI restores the handler it found
