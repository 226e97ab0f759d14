"""Parity with diffusers 0.42 on the same model function and grid, in float64."""

import pytest
import torch

from pdm.sampling import sample
from pdm.schedule import VPSchedule

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only reference (pip install -e '.[dev]')")

N = 1000


def eps_of_label(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear stand-in for a network, a function of x and the integer label."""
    lab = label.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * torch.tanh(x) + 0.2 * torch.sin(lab / 150.0) * x + 0.05 * torch.cos(3 * x)


def run_diffusers(scheduler, steps: int, noise: torch.Tensor) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for n in scheduler.timesteps:
        eps = eps_of_label(x, torch.full((x.shape[0],), int(n)))
        x = scheduler.step(eps, n, x).prev_sample
    return x, scheduler.timesteps


def run_pdm(schedule, labels, noise, **kw):
    grid = (labels.double() + 1) / N  # the discrete convention t_n = (n + 1) / N
    fn = lambda x, t: eps_of_label(x, schedule.label(t).round().long())  # noqa: E731
    return sample(fn, noise, schedule, timesteps=grid, denoise_to_zero=True, prediction="eps", **kw)


@pytest.fixture
def noise():
    return torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("steps", [20, 25])
@pytest.mark.parametrize("order, solver_type", [(2, "midpoint"), (2, "heun"), (3, "midpoint")])
def test_dpmsolver_pp_multistep_matches_diffusers(noise, steps, order, solver_type):
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=N, beta_schedule="linear", beta_start=1e-4,
                                                  beta_end=0.02, algorithm_type="dpmsolver++", solver_order=order,
                                                  solver_type=solver_type, final_sigmas_type="zero")
    ref, labels = run_diffusers(sched, steps, noise)
    ours = VPSchedule.from_betas(sched.betas.double())
    res = run_pdm(ours, labels, noise, solver="dpmsolver++", order=order, solver_type=solver_type)
    assert res.nfe == steps
    rel = (res.x - ref).norm() / ref.norm()
    assert rel < 1e-5, rel.item()


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_diffusers(noise, steps):
    sched = diffusers.DDIMScheduler(num_train_timesteps=N, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    clip_sample=False, set_alpha_to_one=True)
    ref, labels = run_diffusers(sched, steps, noise)
    ours = VPSchedule.from_betas(sched.betas.double())
    res = run_pdm(ours, labels, noise, solver="ddim")
    rel = (res.x - ref).norm() / ref.norm()
    assert rel < 1e-5, rel.item()


def test_parity_fails_for_a_wrong_order(noise):
    # the comparison can fail: 2M against diffusers' 3M differs well above the tolerance
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=N, beta_schedule="linear", solver_order=3,
                                                  final_sigmas_type="zero")
    ref, labels = run_diffusers(sched, 20, noise)
    res = run_pdm(VPSchedule.from_betas(sched.betas.double()), labels, noise, solver="dpmsolver++", order=2)
    assert (res.x - ref).norm() / ref.norm() > 1e-4
