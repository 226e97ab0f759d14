"""Analytical teleportation (pdm.sampling.teleport, its Gaussian fitted by pdm.calibration) against an accurate numerical solve of the
same Gaussian model's ODE, with and without guidance; storage round trip."""

import json

import pytest
import torch

from pdm.calibration import fit_gaussian
from pdm.sampling import sample
from pdm.sampling.guidance import classifier_free_guidance
from pdm.sampling.teleport import GaussianData, Teleport
from pdm.schedule import VPSchedule

SHAPE = (3, 4, 4)


def _data(classes: int | None = 3, rank: int = 48, n: int = 400) -> GaussianData:
    """Anisotropic classes: a random linear map of white noise plus a per-class mean."""
    g = torch.Generator().manual_seed(0)
    d = 48
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.linspace(
        0.02, 0.4, d, dtype=torch.float64
    )
    y = torch.arange(n) % (classes or 1)
    means = torch.rand(classes or 1, d, generator=g, dtype=torch.float64) - 0.5
    x = means[y] + torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T
    return fit_gaussian(x.reshape(n, *SHAPE), y if classes else None, classes, rank=rank)


def _eps_model(data: GaussianData, schedule: VPSchedule):
    """The exact eps of each image's Gaussian (the data's own ODE, for the reference solve)."""

    def fn(x, t, y=None):
        rows = data.rows_for(y, x.shape[0])
        out = torch.empty_like(x.flatten(1))
        for i in range(x.shape[0]):
            a, s = float(schedule.alpha(t[i])), float(schedule.sigma(t[i]))
            d0 = data.denoise(x[i : i + 1].flatten(1), rows[i : i + 1], a, s)
            out[i] = (x[i].flatten() - a * d0[0]) / s
        return out.reshape(x.shape)

    return fn


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_teleport_matches_an_accurate_solve_of_the_gaussian_ode(guidance):
    schedule = VPSchedule.linear()
    data = _data()
    fn = _eps_model(data, schedule)
    if guidance != 1.0:
        fn = classifier_free_guidance(fn, guidance, null_label=3)
    noise = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    t_s = float(schedule.t_of_lambda(torch.tensor(-2.0, dtype=torch.float64)))
    accurate = sample(
        fn,
        noise,
        schedule,
        steps=400,
        solver="unipc",
        order=3,
        skip_type="logSNR",
        t_end=t_s,
        model_kwargs={"y": y},
    ).x
    jumped = Teleport(data, guidance)(noise, schedule, t_s, y)
    err = float((jumped - accurate).abs().max())
    assert err < 1e-5, err
    moved = float((accurate - noise).abs().max())
    assert moved > 0.1  # the jump is not trivial


def test_a_teleport_to_the_start_is_the_identity_and_replays_exactly_from_json():
    schedule = VPSchedule.linear()
    data = _data(rank=8)
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    assert torch.equal(Teleport(data)(noise, schedule, schedule.t_max, y), noise)
    stored = GaussianData.from_dict(json.loads(json.dumps(data.to_dict())))
    again = GaussianData.from_dict(json.loads(json.dumps(stored.to_dict())))
    t_s = 0.7
    a, b = (
        Teleport(stored, 1.5)(noise, schedule, t_s, y),
        Teleport(again, 1.5)(noise, schedule, t_s, y),
    )
    assert torch.equal(a, b)  # once rounded to float32, the stored Gaussian replays bit for bit
    assert stored.digest() == again.digest()
    close = Teleport(data, 1.5)(noise, schedule, t_s, y)
    assert float((a - close).abs().max()) < 1e-4  # float32 storage moves the result little


def test_low_rank_keeps_the_total_variance_and_the_jump_in_sample():
    schedule = VPSchedule.linear()
    full, low = _data(rank=48), _data(rank=4)
    for r in range(full.means.shape[0]):
        total_full = float(full.variances[r].sum() + (48 - 48) * full.residual[r])
        total_low = float(low.variances[r].sum() + (48 - 4) * low.residual[r])
        assert total_low == pytest.approx(total_full, rel=1e-9)
    fn = _eps_model(full, schedule)
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    times = schedule.timesteps(5, "logSNR", 0.6, None, dtype=torch.float64)
    via = sample(
        fn,
        noise,
        schedule,
        steps=5,
        timesteps=times,
        solver="unipc",
        order=3,
        model_kwargs={"y": y},
        teleport=Teleport(full),
    ).x
    by_hand = sample(
        fn,
        Teleport(full)(noise, schedule, 0.6, y),
        schedule,
        steps=5,
        timesteps=times,
        solver="unipc",
        order=3,
        model_kwargs={"y": y},
    ).x
    assert torch.equal(via, by_hand)


def test_bad_inputs_are_refused():
    data = _data(rank=4)
    with pytest.raises(ValueError, match="shape"):
        Teleport(data)(torch.zeros(2, 1, 4, 4), VPSchedule.linear(), 0.5, None)
    with pytest.raises(ValueError, match="at least 2"):
        fit_gaussian(torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="format"):
        GaussianData.from_dict({"format": "other"})


def test_calibration_teleports_where_it_pays_and_the_file_replays_it_bit_identically(tmp_path):
    # the exact mixture at 6 NFE: with a teleport the search starts the path below t_max and its
    # error on the validation images and on new images falls (measured: held out 1.4e-2 -> 7.0e-3)
    from pdm.calibration import calibrate_budgets
    from pdm.sampling import ScheduleFile
    from pdm.testing import GaussianMixture

    schedule = VPSchedule.linear()
    gm = GaussianMixture.random(components=4, shape=SHAPE, std=0.3)
    kw = dict(solver="ipndm", order=3, skip_type="logSNR")
    noise = torch.randn(
        32, *SHAPE, generator=torch.Generator().manual_seed(31), dtype=torch.float64
    )
    stored = GaussianData.from_dict(
        fit_gaussian(gm.sample(4000, torch.Generator().manual_seed(0)), rank=16).to_dict()
    )
    plain = calibrate_budgets(
        gm.model_fn(schedule), noise, schedule, [6], steps=24, halvings=2, **kw
    )[6]
    jumped = calibrate_budgets(
        gm.model_fn(schedule),
        noise,
        schedule,
        [6],
        steps=24,
        halvings=2,
        teleport=Teleport(stored),
        **kw,
    )[6]
    assert plain.teleport is None and jumped.teleport is not None
    assert jumped.settings.timesteps[0] < schedule.t_max and jumped.nfe == 6
    a, b = plain.calibration, jumped.calibration
    assert b["validation_error"] < 0.8 * a["validation_error"], (a, b)
    new = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(97), dtype=torch.float64)
    ref = sample(
        gm.model_fn(schedule), new, schedule, steps=300, solver="unipc", order=3, skip_type="logSNR"
    ).x

    def held(path):
        return float(
            (sample(gm.model_fn(schedule), new, schedule, path.settings).x - ref)
            .pow(2)
            .mean()
            .sqrt()
        )

    assert held(jumped) < 0.8 * held(plain)
    file = tmp_path / "paths.json"
    ScheduleFile({6: jumped}, {"model": "mixture"}, stored).save(file)
    loaded = ScheduleFile.load(file).select(6)
    assert loaded.teleport is not None and loaded.teleport.record() == jumped.teleport.record()
    run = lambda p: sample(gm.model_fn(schedule), new, schedule, **p.sample_kwargs()).x  # noqa: E731
    assert torch.equal(run(loaded), run(jumped))
    text = json.loads(file.read_text())
    text["gaussian"]["means"] = _scaled(
        text["gaussian"]["means"]
    )  # a Gaussian that is not the paths' own
    file.write_text(json.dumps(text))
    with pytest.raises(ValueError, match="Gaussian the file does not hold"):
        ScheduleFile.load(file)


def _scaled(packed: str) -> str:
    import base64

    import numpy as np

    raw = np.frombuffer(base64.b64decode(packed), dtype="<f4") * 0.5
    return base64.b64encode(raw.astype("<f4").tobytes()).decode("ascii")


def test_calibrate_and_sample_cli_carry_the_teleport(tiny_ckpts, tmp_path, monkeypatch):
    # the CLI fits the Gaussian to the training config's data; a teleporting path in the file
    # replays through sample.py exactly as sample() runs it in process
    import numpy as np

    import calibrate as calibrate_cli
    import sample as sample_cli
    from pdm.checkpoints import load_for_sampling
    from pdm.images import to_uint8
    from pdm.outputs import noise_and_label
    from pdm.sampling import LearnedSchedule, ScheduleFile, Settings

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "data:\n  class_path: pdm.data.DigitsDataModule\n  init_args: {image_size: 16, batch_size: 64}\n"
    )
    out = tmp_path / "paths.json"
    summary = calibrate_cli.main(
        [
            "--ckpt",
            tiny_ckpts["cond"],
            "--nfe",
            "3",
            "--steps",
            "8",
            "--num-seeds",
            "4",
            "--teleport-data",
            str(config),
            "--out",
            str(out),
        ]
    )
    assert summary["budgets"][3]["nfe"] == 3
    made = json.loads(out.read_text())["calibrated_for"]
    assert made["teleport_data"] == str(config)
    # a hand-made teleporting path in a file, replayed by sample.py
    loaded = load_for_sampling([tiny_ckpts["cond"]])
    from pdm.data.datamodules import load_digits_tensor

    x, y = load_digits_tensor(16)
    gaussian = GaussianData.from_dict(fit_gaussian(x, y, 10, rank=4).to_dict())
    teleport = Teleport(gaussian)
    times = loaded.schedule.timesteps(3, "logSNR", 0.6, None, dtype=torch.float64).tolist()
    path = LearnedSchedule(
        Settings(steps=3, solver="ipndm", order=3, timesteps=times, teleport=teleport)
    )
    file = tmp_path / "tele.json"
    ScheduleFile({3: path}, {}, gaussian).save(file)
    calls = []
    real = Teleport.__call__
    monkeypatch.setattr(
        Teleport, "__call__", lambda self, *a, **k: calls.append(a[2]) or real(self, *a, **k)
    )
    sample_cli.main(
        [
            "--ckpt",
            tiny_ckpts["cond"],
            "--schedule",
            str(file),
            "--steps",
            "3",
            "--num-samples",
            "2",
            "--labels",
            "4",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    images = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert calls == [pytest.approx(0.6)]  # sample.py teleported its batch to the path's first time
    drawn = [noise_and_label(0, i, (1, 16, 16), 10, [4]) for i in range(2)]
    noise = torch.stack([n for n, _ in drawn])
    kw = ScheduleFile.load(file).select(3).sample_kwargs()
    run = lambda **k: sample(
        loaded.model_fn,
        noise,
        loaded.schedule,
        prediction=loaded.prediction,  # noqa: E731
        model_kwargs={"y": torch.tensor([4, 4])},
        **k,
    ).x.detach()
    assert np.abs(images.astype(int) - to_uint8(run(**kw)).astype(int)).max() <= 1
    without = {k: v for k, v in kw.items() if k != "teleport"}
    assert float((run(**kw) - run(**without)).abs().max()) > 1e-3  # the teleport changes the images
    recorded = json.loads((tmp_path / "s" / "run.json").read_text())["identity"]["settings"]
    assert "Teleport(gaussian sha256 " + gaussian.digest()[:16] in json.dumps(recorded)
