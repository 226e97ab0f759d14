"""Solvers on an exact model (Gaussian-mixture score): errors fall with NFE at the solver's order."""

import math

import pytest
import torch

from pdm.sampling import Settings, sample
from pdm.schedule import VPSchedule
from pdm.testing import GaussianMixture

OLD = Settings(
    solver="dpmsolver++", order=2, grid="time_uniform"
)  # the sampler these tests were written for

SCHEDULE = VPSchedule.linear()
MIXTURE = GaussianMixture.random(components=3, shape=(2,), std=0.5)
NOISE = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference():
    # 333 third-order steps (999 evaluations, no lower-order tail): error ~1e-8 here
    return sample(
        MIXTURE.model_fn(SCHEDULE),
        NOISE,
        SCHEDULE,
        steps=999,
        solver="dpmsolver",
        order=3,
        method="singlestep_fixed",
        skip_type="logSNR",
    ).x


def _observed_order(reference, n_small, n_large, **kw):
    errs = []
    for n in (n_small, n_large):
        x = sample(MIXTURE.model_fn(SCHEDULE), NOISE, SCHEDULE, steps=n, skip_type="logSNR", **kw).x
        errs.append((x - reference).abs().max().item())
    return math.log(errs[0] / errs[1]) / math.log(n_large / n_small)


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(solver="ddim"), 1),
        (dict(solver="dpmsolver++", order=2), 2),
        (dict(solver="dpmsolver++", order=2, solver_type="taylor"), 2),
        (dict(solver="dpmsolver", order=2), 2),
        (dict(solver="dpmsolver++", order=2, method="singlestep"), 2),
        (dict(solver="dpmsolver", order=3, method="singlestep"), 3),
        (dict(solver="dpmsolver++", order=3, method="singlestep", solver_type="taylor"), 3),
        (dict(solver="dpmsolver++", order=3, method="singlestep_fixed"), 3),
    ],
)
def test_error_falls_at_the_solver_order(reference, kw, expected):
    # singlestep_fixed reaches its asymptotic order later on this mixture (measured: 2.55,
    # 2.80, 2.87 for 48->96->192->384), so it gets the longer range
    # and DPM-Solver-fast gets budgets = 2 (mod 3): with 3 | steps it ends in orders [2, 1],
    # and that first-order tail caps its asymptotic order at 2 (by design of the method)
    n_small, n_large = {"singlestep_fixed": (96, 384), "singlestep": (47, 191)}.get(
        kw.get("method"), (48, 192)
    )
    order = _observed_order(reference, n_small, n_large, **kw)
    assert expected - 0.35 < order < expected + 0.8, order


def test_multistep_third_order_beats_second_order_and_converges(reference):
    # 3M starts with a first-order and a second-order step (the official warm-up), whose
    # local errors cap its global order at 2; its local order is checked separately below.
    def err(order):
        x = sample(
            MIXTURE.model_fn(SCHEDULE),
            NOISE,
            SCHEDULE,
            steps=48,
            solver="dpmsolver++",
            order=order,
            skip_type="logSNR",
        ).x
        return (x - reference).abs().max().item()

    assert err(3) < 0.5 * err(2)
    assert _observed_order(reference, 24, 96, solver="dpmsolver++", order=3) > 1.8


def test_adaptive_solver_is_accurate_and_counts_rejected_tries(reference):
    for order in (2, 3):
        loose = sample(
            MIXTURE.model_fn(SCHEDULE),
            NOISE,
            SCHEDULE,
            OLD,
            solver="dpmsolver++",
            order=order,
            method="adaptive",
        )
        tight = sample(
            MIXTURE.model_fn(SCHEDULE),
            NOISE,
            SCHEDULE,
            OLD,
            solver="dpmsolver++",
            order=order,
            method="adaptive",
            atol=1e-4,
            rtol=1e-3,
        )
        assert (loose.x - reference).abs().max().item() < 0.1
        assert (tight.x - reference).abs().max().item() < 2e-3
        assert tight.nfe > loose.nfe
        for res in (loose, tight):
            accepted = res.timesteps.numel() - 1
            assert res.nfe % order == 0 and res.nfe >= order * accepted
            assert res.timesteps[-1].item() == pytest.approx(SCHEDULE.t_min, abs=1e-5)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_prediction_kind_does_not_change_the_sample(prediction):
    kw = dict(steps=15, solver="dpmsolver++", order=2)
    ref = sample(MIXTURE.model_fn(SCHEDULE, "eps"), NOISE, SCHEDULE, OLD, prediction="eps", **kw).x
    got = sample(
        MIXTURE.model_fn(SCHEDULE, prediction), NOISE, SCHEDULE, OLD, prediction=prediction, **kw
    ).x
    assert torch.allclose(got, ref, atol=1e-10)


def test_multistep_nfe_equals_steps_and_denoise_to_zero_adds_one():
    fn = MIXTURE.model_fn(SCHEDULE)
    assert sample(fn, NOISE, SCHEDULE, OLD, steps=12).nfe == 12
    res = sample(fn, NOISE, SCHEDULE, OLD, steps=12, denoise_to_zero=True)
    assert res.nfe == 13 and res.evaluated.shape == (12, 128)
    assert sample(fn, NOISE, SCHEDULE, OLD, steps=10, order=3, method="singlestep").nfe == 10


def test_singlestep_order_split_matches_official_dpm_solver_fast():
    from pdm.sampling import singlestep_orders

    assert singlestep_orders(20, 3) == [3] * 6 + [2]
    assert singlestep_orders(21, 3) == [3] * 6 + [2, 1]
    assert singlestep_orders(10, 3) == [3] * 3 + [1]
    assert singlestep_orders(7, 2) == [2, 2, 2, 1]
    assert all(sum(singlestep_orders(n, k)) == n for n in range(3, 30) for k in (1, 2, 3))


def test_ddpm_ancestral_sampler_reaches_the_data_distribution():
    # 1-D Gaussian data N(0.3, 0.2^2): the exact posterior-mean model makes DDPM with many
    # steps on the training grid produce that distribution.
    gm = GaussianMixture(torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([0.2]))
    noise = torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = sample(
        gm.model_fn(SCHEDULE),
        noise,
        SCHEDULE,
        OLD,
        steps=999,
        solver="ddpm",
        generator=torch.Generator().manual_seed(1),
    )
    assert res.x.mean().item() == pytest.approx(0.3, abs=0.01)
    assert res.x.std().item() == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("order, expected", [(2, 3), (3, 3)])
def test_unipc_converges_one_order_above_its_predictor(reference, order, expected):
    # UniC raises UniP-p to order p + 1; UniPC-3's global order is capped at 3 by its warm-up steps
    observed = _observed_order(reference, 48, 192, solver="unipc", order=order)
    assert expected - 0.35 < observed < expected + 0.8, observed


def _sigma_bar_uniform_grid(steps: int, lo: float = 0.3, hi: float = 3.0) -> torch.Tensor:
    """Times whose sigma/alpha = exp(-lambda) is uniform in [lo, hi] (decreasing)."""
    sig = torch.linspace(hi, lo, steps + 1, dtype=torch.float64)
    return SCHEDULE.t_of_lambda(-torch.log(sig))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_step_from_exact_history_has_local_order_plus_one(order):
    # iPNDM integrates dx̄/dσ̄ = eps with Adams-Bashforth weights for equal steps. For Gaussian
    # data the probability-flow ODE has a closed-form solution; on a grid uniform in σ̄, one step
    # from exact history then errs by C h^(order+1). (On a whole run the global order is 2: the
    # Euler warm-up step dominates, as for every multistep method here.)
    from pdm.sampling.solvers import TimePoint, ipndm_update

    mu, s = 0.3, 0.5
    gaussian = GaussianMixture(torch.full((1, 2), mu, dtype=torch.float64), torch.tensor([s]))
    fn = gaussian.model_fn(SCHEDULE)
    x_T = NOISE[:32]

    def exact(t):  # the ODE flow of N(mu, s^2) data from t = 1 to t
        a0, s0 = (
            SCHEDULE.alpha(torch.tensor(1.0, dtype=torch.float64)),
            SCHEDULE.sigma(torch.tensor(1.0, dtype=torch.float64)),
        )
        a1, s1 = SCHEDULE.alpha(t), SCHEDULE.sigma(t)
        return a1 * mu + torch.sqrt(a1**2 * s**2 + s1**2) * (x_T - a0 * mu) / torch.sqrt(
            a0**2 * s**2 + s0**2
        )

    errors = []
    for h in (0.02, 0.01):
        times = _sigma_bar_uniform_grid(order, lo=1.0, hi=1.0 + order * h)
        points = [TimePoint.at(SCHEDULE, t) for t in times]
        states = [exact(t) for t in times]
        eps = [fn(states[k], times[k].expand(len(x_T))) for k in range(order)]
        x_next = ipndm_update(states[order - 1], points[order - 1], points[order], eps, order)
        errors.append((x_next - states[order]).abs().max().item())
    observed = math.log2(errors[0] / errors[1])
    assert order + 1 - 0.2 < observed < order + 1 + 0.3, (errors, observed)


def test_edm_grid_is_uniform_in_sigma_to_the_one_over_rho():
    grid = SCHEDULE.timesteps(12, "edm")
    sigma_bar = torch.exp(-SCHEDULE.lambda_(grid))
    root = sigma_bar ** (1 / 7)
    assert torch.allclose(root.diff(), root.diff()[0].expand(12), rtol=1e-6)
    assert grid[0].item() == SCHEDULE.t_max and grid[-1].item() == pytest.approx(
        SCHEDULE.t_min, abs=1e-15
    )
    assert bool((grid.diff() < 0).all())


def test_every_solver_works_on_every_grid(reference):
    # 100 steps of any solver on any grid land within 3e-2 of the reference (the worst pair,
    # DPM-Solver++(3M) on time_uniform, measured 2.3e-2; most are below 1e-3), 10 steps do not
    for solver, order in (("unipc", 3), ("ipndm", 4), ("dpmsolver++", 3)):
        for skip_type in ("time_uniform", "logSNR", "time_quadratic", "edm"):
            errors = [
                (
                    sample(
                        MIXTURE.model_fn(SCHEDULE),
                        NOISE,
                        SCHEDULE,
                        steps=n,
                        solver=solver,
                        order=order,
                        skip_type=skip_type,
                    ).x
                    - reference
                )
                .abs()
                .max()
                .item()
                for n in (10, 100)
            ]
            assert errors[1] < 3e-2 and errors[1] < errors[0] / 3, (solver, skip_type, errors)


def test_adaptive_method_reports_one_row_per_accepted_step():
    res = sample(
        MIXTURE.model_fn(SCHEDULE),
        NOISE[:5],
        SCHEDULE,
        OLD,
        solver="dpmsolver++",
        order=2,
        method="adaptive",
    )
    assert res.evaluated.shape == (res.timesteps.numel() - 1, 5) and bool(res.evaluated.all())


@pytest.mark.parametrize(
    "kw",
    [
        dict(solver="dpmsolver++", order=2),
        dict(solver="ipndm", order=3),
        dict(solver="unipc", order=2),
        dict(solver="dpmsolver", order=2, method="singlestep"),
        dict(solver="dpmsolver++", order=2, method="adaptive"),
    ],
)
def test_callback_sees_every_step_with_its_state_and_x0(kw):
    seen = []
    res = sample(
        MIXTURE.model_fn(SCHEDULE),
        NOISE[:8],
        SCHEDULE,
        steps=8,
        skip_type="logSNR",
        callback=seen.append,
        **kw,
    )
    assert [info.i for info in seen] == list(range(res.evaluated.shape[0]))  # once per step
    assert torch.equal(torch.stack([info.t for info in seen]), res.timesteps[:-1])
    assert torch.equal(seen[0].x, NOISE[:8])
    # UniPC's output at t was evaluated at the predictor's state, which its corrector then moved
    atol = (
        5e-2 if kw["solver"] == "unipc" else 1e-10
    )  # 8 steps: the correction moves x by up to ~3e-2
    for info in seen:  # the x0 prediction at (x, t), independently from the exact eps
        t = info.t.expand(8)
        alpha, sigma = SCHEDULE.alpha(t)[:, None], SCHEDULE.sigma(t)[:, None]
        x0 = (info.x - sigma * MIXTURE.model_fn(SCHEDULE)(info.x, t)) / alpha
        assert torch.allclose(info.x0, x0, atol=atol) and bool(info.evaluated.all())
