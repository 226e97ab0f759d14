"""Skipping by forecast: the extrapolation, the error criterion, accounting (calibrated paths:
test_calibration.py)."""

import pytest
import torch

from pdm.sampling import AdaptiveSkip, FixedSkip, LearnedSchedule, Settings, sample
from pdm.sampling.skipper import OutputHistory, lagrange_extrapolate
from pdm.schedule import VPSchedule
from pdm.testing import GaussianMixture

OLD = Settings(
    solver="dpmsolver++", order=2, grid="time_uniform"
)  # the sampler these tests were written for

S = VPSchedule.linear()
GM = GaussianMixture.random(components=4, shape=(3, 4, 4), std=0.3)
NOISE = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_forecast_is_exact_on_outputs_polynomial_in_lambda_of_its_order(order):
    g = torch.Generator().manual_seed(order)
    coeffs = torch.randn(
        order + 1, 5, 2, 3, dtype=torch.float64, generator=g
    )  # per sample, per pixel
    lams = (
        torch.rand(order + 1, 5, dtype=torch.float64, generator=g) * 4 - 3
    )  # different nodes per sample
    lams = lams + torch.arange(order + 1, dtype=torch.float64)[:, None]  # distinct

    def poly(lam):  # (B,) -> (B, 2, 3)
        return sum(c * lam.reshape(-1, 1, 1) ** p for p, c in enumerate(coeffs))

    values = torch.stack([poly(lams[j]) for j in range(order + 1)])
    target = torch.tensor(1.7, dtype=torch.float64)
    assert torch.allclose(
        lagrange_extrapolate(lams, values, target), poly(target.expand(5)), atol=1e-9
    )
    if order >= 1:  # one order lower is not exact: the test can fail
        low = lagrange_extrapolate(lams[1:], values[1:], target)
        assert not torch.allclose(low, poly(target.expand(5)), atol=1e-6)


def test_output_history_forecasts_each_sample_from_its_own_evaluations():
    hist = OutputHistory(size=3)
    hist.start(torch.zeros(4, 2, dtype=torch.float64))
    rows_all = torch.arange(4)
    for lam in (0.0, 1.0):
        hist.push(
            rows_all, torch.full((4, 2), 3.0 + 2.0 * lam, dtype=torch.float64), torch.tensor(lam)
        )
    # sample 2 evaluates once more, at lambda 2.5: still the same line 3 + 2 lambda
    hist.push(torch.tensor([2]), torch.full((1, 2), 8.0, dtype=torch.float64), torch.tensor(2.5))
    out = hist.forecast(torch.tensor(4.0), order=2, rows=rows_all)
    assert torch.allclose(out, torch.full((4, 2), 11.0, dtype=torch.float64))


def _x0_model(curve):
    """A model whose data prediction depends on t only: x0(t) = curve(lambda(t)) * ones."""

    def fn(x, t):
        lam = S.lambda_(t.double())
        return curve(lam).reshape(-1, 1, 1, 1).to(x.dtype) * torch.ones_like(x)

    return fn


def test_error_criterion_skips_on_a_linear_trajectory_and_refuses_at_a_kink():
    steps, skip = 40, AdaptiveSkip(threshold=1.0, max_skips=3, warmup=4, forecast_order=2)
    kw = dict(
        steps=steps, solver="dpmsolver++", order=2, prediction="x0", skip_type="logSNR", skip=skip
    )
    linear = sample(_x0_model(lambda lam: 0.3 + 0.05 * lam), NOISE, S, **kw)
    grid_lam = S.lambda_(S.timesteps(steps, "logSNR"))
    kink_at = float(grid_lam[20])
    kink = sample(_x0_model(lambda lam: 0.3 + 0.4 * (lam - kink_at).abs()), NOISE, S, **kw)
    expected = [True] * 4
    while len(expected) < steps:
        expected += [False] * 3 + [True]
    assert linear.evaluated[:, 0].tolist() == expected[:steps]  # skips at the maximum rate
    assert kink.nfe > linear.nfe  # the kink costs evaluations
    assert bool(kink.evaluated[19:23].any(dim=0).all())  # next to the kink every sample evaluates


def test_default_skipping_is_per_sample_and_independent_of_the_batch():
    skip = AdaptiveSkip(threshold=3.0)
    batch = sample(GM.model_fn(S), NOISE, S, OLD, steps=40, skip=skip, skip_type="logSNR")
    assert 0 < (~batch.evaluated).sum() < batch.evaluated.numel()
    for b in range(NOISE.shape[0]):
        alone = sample(
            GM.model_fn(S), NOISE[b : b + 1], S, OLD, steps=40, skip=skip, skip_type="logSNR"
        )
        assert torch.equal(alone.evaluated[:, 0], batch.evaluated[:, b])
        assert torch.allclose(alone.x[0], batch.x[b], atol=1e-12)


def test_network_sees_only_the_rows_it_evaluates_with_forecast_fill():
    rows = []

    def fn(x, t):
        rows.append(x.shape[0])
        return GM.model_fn(S)(x, t)

    res = sample(fn, NOISE, S, OLD, steps=40, skip=AdaptiveSkip(threshold=3.0), skip_type="logSNR")
    assert sum(rows) == int(res.nfe_per_sample.sum()) < 40 * 6
    assert torch.equal(res.nfe_per_sample, res.evaluated.sum(0))


def test_forecast_fill_beats_reuse_on_the_same_path():
    ref = sample(GM.model_fn(S), NOISE, S, steps=200, solver="unipc", order=3, skip_type="logSNR").x
    evaluate = tuple(i < 4 or i % 2 == 0 for i in range(40))
    err = {}
    for fill in ("forecast", "reuse"):
        x = sample(
            GM.model_fn(S),
            NOISE,
            S,
            OLD,
            steps=40,
            skip_type="logSNR",
            skip=FixedSkip(evaluate, fill=fill),
        ).x
        err[fill] = (x - ref).pow(2).mean().sqrt().item()
    assert err["forecast"] < 0.5 * err["reuse"]


def test_schedule_files_that_are_not_schedules_are_clear_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a schedule file"):
        LearnedSchedule.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="does not exist"):
        LearnedSchedule.load(tmp_path / "missing.json")
