"""sample.py never takes a damaged or partial shard for a finished one, and a full disk loses nothing."""

import errno
import json
import os

import numpy as np
import pytest

import sample as sample_cli
from pdm.outputs import hash_path, shard_state

ARGS = [
    "--num-samples",
    "9",
    "--batch-size",
    "3",
    "--shard-size",
    "3",
    "--steps",
    "3",
    "--device",
    "cpu",
]


def run(ckpt, out, *extra):
    return sample_cli.main(["--ckpt", ckpt, *ARGS, "--out", str(out), *extra])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_each_finished_shard_records_its_content_hash(tiny_ckpts, tmp_path):
    run(tiny_ckpts["uncond"], tmp_path)
    shards = sorted((tmp_path / "shards").glob("shard_*.npz"))
    assert len(shards) == 3 and all(shard_state(s) == "finished" for s in shards)
    import hashlib

    assert (
        hash_path(shards[0]).read_text().strip()
        == hashlib.sha256(shards[0].read_bytes()).hexdigest()
    )


def test_a_damaged_shard_is_remade_on_resume(tiny_ckpts, tmp_path, capsys):
    run(tiny_ckpts["uncond"], tmp_path / "whole")
    out = tmp_path / "run"
    run(tiny_ckpts["uncond"], out)
    (out / "samples.npz").unlink()  # as if the run had stopped before its final files
    flip_a_byte(out / "shards" / "shard_00001.npz")
    hash_path(
        out / "shards" / "shard_00002.npz"
    ).unlink()  # written, but never recorded as finished
    capsys.readouterr()
    stats = run(tiny_ckpts["uncond"], out)
    err = capsys.readouterr().err
    assert "shard_00001.npz does not match its recorded hash" in err and "shard_00002.npz" in err
    assert (
        stats["images_sampled_this_run"] == 6
    )  # the two bad shards, and only those, were made again
    assert (out / "samples.npz").read_bytes() == (tmp_path / "whole" / "samples.npz").read_bytes()


def test_merge_refuses_a_damaged_shard_by_name(tiny_ckpts, tmp_path, capsys):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        run(tiny_ckpts["uncond"], part, "--num-shards", "2", "--shard-index", str(i))
    flip_a_byte(parts[1] / "shards" / "shard_00001.npz")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample_cli.main(["--merge", *map(str, parts), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        e.value.code == 2
        and len(err) == 1
        and "shard_00001.npz does not match its recorded hash" in err[0]
    )
    assert not (tmp_path / "merged" / "samples.npz").exists()


def test_a_full_disk_while_writing_a_shard_exits_2_and_keeps_the_finished_shards(
    tiny_ckpts, tmp_path, monkeypatch, capsys
):
    import pdm.outputs.folder as outputs

    real = np.savez
    calls = {"n": 0}

    def savez_filling_the_disk(f, **arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, **arrays)

    monkeypatch.setattr(outputs.np, "savez", savez_filling_the_disk)
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tiny_ckpts["uncond"], out)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sample.py:")]
    assert (
        e.value.code == 2
        and len(err) == 1
        and "No space left on device" in err[0]
        and "free" in err[0]
    )
    names = sorted(os.listdir(out / "shards"))
    assert names == [
        "shard_00000.npz",
        "shard_00000.npz.sha256",
    ]  # the finished shard, no partial file
    monkeypatch.undo()
    stats = run(tiny_ckpts["uncond"], out)  # the same command finishes the run
    assert stats["images_sampled_this_run"] == 6
    assert json.loads((out / "stats.json").read_text())["num_samples"] == 9
