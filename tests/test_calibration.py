"""Learned schedules (pdm.calibration): saved schedules replay bit-identically, a learned schedule
beats the built-in grid on held-out seeds, the time search finds a known optimum, and the greedy
search picks the least harmful skip (calibrate.py: test_calibrate_cli.py)."""

import pytest
import torch

from pdm.calibration import calibrate_schedule, greedy_skip_path
from pdm.calibration.times import refine_times
from pdm.sampling import FixedSkip, LearnedSchedule, Settings, sample
from pdm.schedule import VPSchedule
from pdm.testing import GaussianMixture

S = VPSchedule.linear()
GM = GaussianMixture.random(components=4, shape=(3, 4, 4), std=0.3)
NOISE = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def test_a_learned_schedule_saved_and_loaded_replays_bit_identically(tmp_path):
    kw = dict(solver="dpmsolver++", order=2, skip_type="logSNR")
    calib = torch.randn(
        4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11)
    )
    on_grid = calibrate_schedule(
        GM.model_fn(S), calib, S, nfe=8, steps=24, refine_sweeps=1, continuous=False, **kw
    )
    assert on_grid.nfe == 8 and len(on_grid.grid_points) == 8 and on_grid.grid_points[0] == 0
    assert on_grid.settings == Settings(steps=24, solver="dpmsolver++", order=2, grid="logSNR")
    free = calibrate_schedule(
        GM.model_fn(S), calib, S, nfe=8, steps=24, refine_sweeps=1, halvings=1, **kw
    )
    assert free.nfe == 8 and free.grid_points is None and len(free.settings.timesteps) == 9
    assert free.settings.steps == 8
    for learned in (on_grid, free):
        learned.save(tmp_path / "schedule.json")
        back = LearnedSchedule.load(tmp_path / "schedule.json")
        assert back == learned and back.settings == learned.settings
        a = sample(GM.model_fn(S), NOISE, S, learned.settings_for(S))
        b = sample(GM.model_fn(S), NOISE, S, back.settings_for(S))
        assert torch.equal(a.x, b.x) and a.nfe == 8
    # a schedule of grid points replays as the run of the fine grid's kept times
    kept = S.timesteps(24, "logSNR")[[*on_grid.grid_points, 24]]
    d = sample(GM.model_fn(S), NOISE, S, steps=8, timesteps=kept, **kw)
    assert torch.equal(d.x, sample(GM.model_fn(S), NOISE, S, **on_grid.sample_kwargs(S)).x)
    # the free schedule's replay is the run of its grid
    grid = torch.tensor(free.settings.timesteps, dtype=torch.float64)
    c = sample(GM.model_fn(S), NOISE, S, steps=8, timesteps=grid, **kw)
    assert torch.equal(c.x, sample(GM.model_fn(S), NOISE, S, **free.sample_kwargs()).x)


def test_calibration_beats_the_uniform_grid_of_the_same_nfe_on_held_out_seeds():
    kw = dict(solver="dpmsolver++", order=2, skip_type="logSNR")
    calib = torch.randn(
        16, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(21)
    )
    held_out = torch.randn(
        16, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(22)
    )
    on_grid = calibrate_schedule(
        GM.model_fn(S), calib, S, nfe=8, steps=24, refine_sweeps=1, continuous=False, **kw
    )
    free = calibrate_schedule(
        GM.model_fn(S), calib, S, nfe=8, steps=24, refine_sweeps=1, halvings=2, **kw
    )
    ref = sample(
        GM.model_fn(S), held_out, S, steps=300, solver="unipc", order=3, skip_type="logSNR"
    ).x
    rms = lambda x: (x - ref).pow(2).mean().sqrt().item()  # noqa: E731
    plain = rms(sample(GM.model_fn(S), held_out, S, steps=8, **kw).x)
    errors = {
        name: rms(sample(GM.model_fn(S), held_out, S, p.settings_for(S)).x)
        for name, p in (("on_grid", on_grid), ("free", free))
    }
    assert errors["on_grid"] < plain and errors["free"] < errors["on_grid"], (plain, errors)


def test_refine_times_finds_the_best_interior_time_and_keeps_the_ends():
    # a score with a known minimum: lambda of the middle point at 0.3 of the span
    lam = torch.tensor([-6.0, 0.0, 4.0], dtype=torch.float64)
    times = S.t_of_lambda(lam).double()
    target = -6.0 + 0.3 * 10.0
    score = lambda t: abs(float(S.lambda_(t)[1]) - target)  # noqa: E731
    grid, best = refine_times(times, S, score, halvings=12)
    assert grid[0] == times[0] and grid[-1] == times[-1] and bool((grid[:-1] > grid[1:]).all())
    assert best < 10.0 * 0.5 / 2 * 2**-12 + 1e-9 and abs(
        float(S.lambda_(grid)[1]) - target
    ) == pytest.approx(best)
    # moves never cross a neighbour, however the score pulls
    grid, _ = refine_times(times, S, lambda t: -float(S.lambda_(t)[1]), halvings=6)
    assert float(S.lambda_(grid)[1]) < 4.0 and bool((grid[:-1] > grid[1:]).all())


def test_greedy_path_adds_the_least_harmful_skip_each_round():
    steps = 10
    kw = dict(solver="dpmsolver++", order=2, skip_type="time_uniform")
    hist = greedy_skip_path(GM.model_fn(S), NOISE, S, budget=3, steps=steps, **kw)
    full = sample(GM.model_fn(S), NOISE, S, steps=steps, **kw).x
    rms = lambda x: float((x - full).pow(2).mean().sqrt())  # noqa: E731
    assert [sum(not e for e in p.evaluate) for p, _ in hist] == [1, 2, 3]
    # round 1 is the best single skip: check against an exhaustive search
    singles = []
    for i in range(1, steps):
        ev = [True] * steps
        ev[i] = False
        singles.append(
            rms(sample(GM.model_fn(S), NOISE, S, steps=steps, skip=FixedSkip(tuple(ev)), **kw).x)
        )
    assert hist[0][1] == pytest.approx(min(singles))
    for path, err in hist:
        assert rms(
            sample(GM.model_fn(S), NOISE, S, steps=steps, skip=path, **kw).x
        ) == pytest.approx(err)
