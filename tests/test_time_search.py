"""The smooth warp of a time grid (pdm.calibration.times): it keeps the ends and the order,
describes any NFE with three numbers, and its search finds a known optimum; with validation it
keeps the grid that is best on the validation score, not on the fitted one."""

import math

import pytest
import torch

from pdm.calibration.times import refine_warp, warped_lambdas
from pdm.schedule import VPSchedule

S = VPSchedule.linear()


def test_zero_warp_is_the_start_grid_and_a_warp_keeps_ends_and_order():
    start = torch.linspace(-8.0, 6.0, 21, dtype=torch.float64) ** 1  # any increasing lambdas
    assert torch.equal(warped_lambdas(start, [0.0, 0.0, 0.0]), start)
    lam = warped_lambdas(start, [0.1, -0.05, 0.02])
    assert lam[0] == start[0] and lam[-1] == start[-1] and bool((lam[1:] > lam[:-1]).all())
    # w(u) = u + 0.1 sin(pi u) at the middle point, read on the uniform start grid (closed form)
    w = (
        0.5
        + 0.1 * math.sin(math.pi * 0.5)
        - 0.05 * math.sin(math.pi)
        + 0.02 * math.sin(1.5 * math.pi)
    )
    assert float(lam[10]) == pytest.approx(-8.0 + 14.0 * w, abs=1e-12)
    # a warp that folds the grid back on itself is refused
    assert warped_lambdas(start, [0.5, 0.0, 0.0]) is None


def test_refine_warp_recovers_a_known_warp_at_any_nfe():
    for nfe in (5, 20):
        times = S.timesteps(nfe, "logSNR", 1.0, 1e-3, dtype=torch.float64)
        start = S.lambda_(times)
        target = warped_lambdas(start, [0.06, -0.03, 0.015])

        def score(t, target=target):
            return float((S.lambda_(t) - target).abs().max())

        grid, best, coeffs = refine_warp(times, S, score, halvings=10)
        assert grid[0] == times[0] and grid[-1] == times[-1] and bool((grid[:-1] > grid[1:]).all())
        assert coeffs == pytest.approx([0.06, -0.03, 0.015], abs=2e-3)
        assert best < 0.05 and best == pytest.approx(score(grid))


def test_refine_warp_keeps_the_grid_validation_prefers():
    times = S.timesteps(10, "logSNR", 1.0, 1e-3, dtype=torch.float64)
    start = S.lambda_(times)
    fitted = warped_lambdas(start, [0.1, 0.0, 0.0])
    # the fitted score pulls toward c1 = 0.1; validation is least at the start grid itself
    grid, best, coeffs = refine_warp(
        times,
        S,
        lambda t: float((S.lambda_(t) - fitted).abs().max()),
        halvings=4,
        validate=lambda t: float((S.lambda_(t) - start).abs().max()),
    )
    assert coeffs == [0.0, 0.0, 0.0] and torch.allclose(grid, times)
    assert best == pytest.approx(float((start - fitted).abs().max()))


def test_calibrated_warp_starts_from_the_best_built_in_grid_without_the_fine_grid_search(
    monkeypatch,
):
    import pdm.calibration.grid_points as grid_points
    import pdm.calibration.schedules as calibration
    from pdm.sampling import sample
    from pdm.testing import GaussianMixture

    gm = GaussianMixture.random(components=4, shape=(3, 4, 4), std=0.3)
    noise = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    kw = dict(solver="ipndm", order=3)

    def no_fine_grid(*args, **kwargs):
        raise AssertionError("the warp needs no fine-grid path")

    monkeypatch.setattr(grid_points, "_dp_path", no_fine_grid)
    path = calibration.calibrate_schedule(
        gm.model_fn(S), noise, S, nfe=6, steps=24, halvings=4, time_search="warp", **kw
    )
    times = torch.tensor(path.settings.timesteps, dtype=torch.float64)
    ref = sample(gm.model_fn(S), noise, S, steps=400, solver="unipc", order=3, skip_type="logSNR").x

    def err(**s):
        return float((sample(gm.model_fn(S), noise, S, **kw, **s).x - ref).pow(2).mean().sqrt())

    built_in = min(
        err(steps=6, skip_type=g) for g in ("logSNR", "time_uniform", "time_quadratic", "edm")
    )
    assert err(steps=6, timesteps=times) <= built_in * 1.01  # never worse than where it started
    assert err(steps=6, timesteps=times) < 0.9 * built_in  # and the warp found a better grid here
    with pytest.raises(ValueError, match="time_search must be one of free, warp, warp\\+free"):
        calibration.calibrate_schedule(
            gm.model_fn(S), noise, S, nfe=6, steps=24, time_search="smooth", **kw
        )
