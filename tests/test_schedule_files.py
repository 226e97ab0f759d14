"""Schedule files of every version load and replay bit for bit.

The fixtures under tests/fixtures/schedules/ were written by the code before the schedule rename
(commit b1a6b6f, `make_old_formats.py` there): the first format (one path, no format key: fine-grid
points, a fixed reuse pattern, one made with the sampler defaults of that time) and
``pdm-skip-paths-v2`` (times with learned coefficients; a teleport with its Gaussian). With them is
what each replayed to then, on four fixed noises. Today's code must load them and replay them to
what they gave then, and write them again in today's format without a change of replay.

The replays were recorded on one CPU (an AVX-512 Xeon); another CPU's vector kernels round the
last bits of float64 arithmetic differently (seen on an AVX2-only EPYC: the teleport and the
learned-coefficient files differ in the last bits), so the recorded replays are compared within
1e-9, far above that rounding (a few 1e-16 per operation over some dozens of steps) and far below
what a wrong replay moves (another grid, a lost coefficient, a misread format: 1e-4 or more, as
the files' replays differ from one another). Comparisons of results computed in the same run on
the same machine stay bit for bit."""

import json
from pathlib import Path

import pytest
import torch

from pdm.sampling import FixedSkip, LearnedSchedule, ScheduleFile, SkipPath, sample
from pdm.sampling.learned import SCHEDULE_FORMAT
from pdm.schedule import VPSchedule
from pdm.testing import GaussianMixture

HERE = Path(__file__).resolve().parent / "fixtures" / "schedules"
S = VPSchedule.linear()
GM = GaussianMixture.random(components=4, shape=(3, 4, 4), std=0.3)
NEW = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2024))
REPLAYS = torch.load(HERE / "replays.pt", weights_only=True)


RECORDED = {"rtol": 0.0, "atol": 1e-9}  # against replays recorded on another CPU (docstring)


def test_the_recorded_replays_are_far_apart_compared_with_the_tolerance():
    replays = [REPLAYS[k] for k in sorted(REPLAYS)]
    gaps = [float((a - b).abs().max()) for i, a in enumerate(replays) for b in replays[i + 1 :]]
    assert min(gaps) > 1e5 * RECORDED["atol"]


@pytest.mark.parametrize("key", sorted(REPLAYS))
def test_old_schedule_files_replay_as_recorded(key, tmp_path):
    name, nfe = key.split(":")
    learned = ScheduleFile.load(HERE / name).select(int(nfe))
    assert learned.nfe == int(nfe)
    x = sample(GM.model_fn(S), NEW, S, learned.settings_for(S)).x
    torch.testing.assert_close(x, REPLAYS[key], **RECORDED)
    assert torch.equal(
        sample(GM.model_fn(S), NEW, S, **learned.sample_kwargs(S)).x, x
    )  # the keyword form
    again = tmp_path / "again.json"  # written again in today's format: the same replay
    ScheduleFile.load(HERE / name).save(again)
    assert json.loads(again.read_text())["format"] == SCHEDULE_FORMAT
    assert torch.equal(
        sample(GM.model_fn(S), NEW, S, LearnedSchedule.load(again, int(nfe)).settings_for(S)).x, x
    )


def test_what_the_old_files_hold_reads_as_plain_settings():
    coef = ScheduleFile.load(HERE / "v2_times_coefficients.json")
    assert coef.budgets == [4, 6] and coef.calibrated_for["files"] == ["made/by/the/fixture"]
    six = coef.select(6).settings
    assert (six.solver, six.order, six.steps, len(six.timesteps)) == (
        "ipndm",
        3,
        6,
        7,
    ) and six.corrections[1] == -0.21875
    assert ScheduleFile.load(HERE / "v2_teleport.json").select(5).teleport is not None
    points = SkipPath.load(HERE / "v1_grid_points.json")  # the old name still loads a schedule
    assert points.grid_points == (0, 5, 8, 9, 11) and points.settings.steps == 16
    assert points.settings_for(S).timesteps == tuple(
        S.timesteps(16, "logSNR")[[0, 5, 8, 9, 11, 16]].tolist()
    )
    with pytest.raises(ValueError, match="pass the noise schedule"):
        points.settings_for()
    bare = LearnedSchedule.load(
        HERE / "v1_defaults.json"
    ).settings  # what the sampler defaulted to then
    assert (bare.solver, bare.order, bare.grid) == ("dpmsolver++", 2, "time_uniform")
    reuse = LearnedSchedule.load(HERE / "v1_reuse.json").settings
    assert reuse.skip == FixedSkip((True, True, False, True, True, False, True, True), "reuse")


def test_a_newer_format_names_what_it_needs(tmp_path):
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"format": "pdm-schedule-v9", "schedules": {}}))
    with pytest.raises(
        ValueError, match="'pdm-schedule-v9' is newer than this pdm reads .*upgrade pdm"
    ):
        ScheduleFile.load(newer)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a schedule file written by calibrate.py"):
        ScheduleFile.load(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="does not exist"):
        ScheduleFile.load(tmp_path / "missing.json")
