"""Parity with independent references on the same model function, in float64.

References: diffusers 0.42's schedulers, with their sigmas recomputed in float64 after
``set_timesteps`` (they store float32 copies), and, where diffusers implements a different
variant, a NumPy implementation of the official algorithm (``reference_singlestep.py``).
Grids are made by pdm itself wherever diffusers accepts them: the schedules below are sized
so that pdm's ``time_uniform`` and ``time_quadratic`` grids land on integer timesteps.
"""

import numpy as np
import pytest
import torch

from pdm.sampling import sample
from pdm.schedule import VPSchedule

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the test-only reference (pip install -e '.[dev]')"
)
from reference_singlestep import Schedule as RefSchedule  # noqa: E402
from reference_singlestep import singlestep_sample  # noqa: E402

EXACT = 1e-12  # relative; float64 on both sides
FLOAT32_REFERENCE = (
    1e-6  # DPMSolverMultistepScheduler casts the sample to float32 every step (measured 1.2e-7)
)


def eps_of_label(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear stand-in for a network, a function of x and the (possibly fractional) label."""
    lab = label.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * torch.tanh(x) + 0.2 * torch.sin(lab / 150.0) * x + 0.05 * torch.cos(3 * x)


def linear_betas(n: int) -> torch.Tensor:
    """Linear betas over n steps, with the end scaled so the schedule ends as noisy as DDPM's."""
    return torch.linspace(1e-4, 0.02 * 1000 / n, n, dtype=torch.float64)


class Setup:
    """A schedule of n steps seen by pdm and by a diffusers scheduler, and a model on both sides."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.betas = linear_betas(n)
        self.schedule = VPSchedule.from_betas(self.betas)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)

    def pdm_model(self, prediction: str = "eps"):
        def fn(x, t):
            label = self.schedule.label(t)
            eps = eps_of_label(x, label)
            return self.convert(eps, x, label, prediction)

        return fn

    def convert(self, eps, x, label, prediction):
        if prediction == "eps":
            return eps
        abar = torch.as_tensor(
            np.interp(label.numpy(), np.arange(self.n), self.alphas_cumprod.numpy())
        )
        a, s = abar.sqrt().reshape(-1, 1, 1, 1), (1 - abar).sqrt().reshape(-1, 1, 1, 1)
        x0 = (x - s * eps) / a
        return x0 if prediction == "x0" else a * eps - s * x0

    def scheduler(self, cls, **kw):
        return cls(num_train_timesteps=self.n, trained_betas=self.betas.numpy(), **kw)

    def to_float64(self, sched, final: str) -> None:
        """Replace the scheduler's float32 sigmas by float64 ones from the same alphas_cumprod."""
        sigma = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        last = torch.zeros(1, dtype=torch.float64) if final == "zero" else sigma[:1]
        sched.sigmas = torch.cat([sigma[sched.timesteps.long()], last])

    def run(self, sched, noise, prediction="eps", generator=None):
        x = noise.clone()
        for n in sched.timesteps:
            label = torch.full((x.shape[0],), int(n))
            out = self.convert(eps_of_label(x, label), x, label.double(), prediction)
            x = sched.step(out, n, x, **({"generator": generator} if generator else {})).prev_sample
        return x

    def labels(self, steps: int, skip_type: str) -> list[int]:
        """pdm's own grid as integer timesteps (the test sizes make them exact)."""
        labels = self.schedule.label(self.schedule.timesteps(steps, skip_type))
        assert torch.allclose(labels, labels.round(), atol=1e-6)
        return labels.round().long().tolist()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def noise():
    return torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


# --- multistep DPM-Solver(++) ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [20, 25])
@pytest.mark.parametrize("order, solver_type", [(2, "midpoint"), (2, "heun"), (3, "midpoint")])
def test_dpmsolver_pp_multistep_matches_diffusers(noise, steps, order, solver_type):
    # diffusers' own grid injected into pdm; its final step to sigma = 0 is pdm's denoise_to_zero
    setup = Setup(1000)
    sched = setup.scheduler(
        diffusers.DPMSolverMultistepScheduler,
        algorithm_type="dpmsolver++",
        solver_order=order,
        solver_type=solver_type,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(steps)
    setup.to_float64(sched, "zero")
    ref = setup.run(sched, noise)
    grid = (sched.timesteps.double() + 1) / setup.n
    res = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        timesteps=grid,
        denoise_to_zero=True,
        solver="dpmsolver++",
        order=order,
        solver_type=solver_type,
    )
    assert res.nfe == steps  # steps - 1 solver steps on the injected grid, then the denoise
    assert rel(res.x, ref) < FLOAT32_REFERENCE


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpmsolver_pp_on_pdm_grid_with_each_prediction_matches_diffusers(noise, prediction, order):
    setup = Setup(1000)
    kind = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[prediction]
    sched = setup.scheduler(
        diffusers.DPMSolverMultistepScheduler,
        algorithm_type="dpmsolver++",
        solver_order=order,
        final_sigmas_type="zero",
        prediction_type=kind,
    )
    labels = setup.labels(27, "time_uniform")  # 999, 962, ..., 0: pdm's grid, integer
    sched.set_timesteps(timesteps=labels)
    setup.to_float64(sched, "zero")
    ref = setup.run(sched, noise, prediction)
    res = sample(
        setup.pdm_model(prediction),
        noise,
        setup.schedule,
        steps=27,
        skip_type="time_uniform",
        solver="dpmsolver++",
        order=order,
        prediction=prediction,
        denoise_to_zero=True,
    )
    assert rel(res.x, ref) < FLOAT32_REFERENCE


@pytest.mark.parametrize("order, solver_type", [(2, "midpoint"), (2, "heun"), (3, "midpoint")])
def test_noise_form_dpmsolver_multistep_on_pdm_grid_matches_diffusers(noise, order, solver_type):
    setup = Setup(1000)
    sched = setup.scheduler(
        diffusers.DPMSolverMultistepScheduler,
        algorithm_type="dpmsolver",
        solver_order=order,
        solver_type=solver_type,
        final_sigmas_type="sigma_min",
    )
    labels = setup.labels(27, "time_uniform")
    sched.set_timesteps(timesteps=labels[:-1])  # the last step lands on sigma_min, i.e. label 0
    setup.to_float64(sched, "sigma_min")
    ref = setup.run(sched, noise)
    res = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        steps=27,
        skip_type="time_uniform",
        solver="dpmsolver",
        order=order,
        solver_type=solver_type,
    )
    assert rel(res.x, ref) < FLOAT32_REFERENCE


def test_thresholding_matches_diffusers_and_changes_the_sample(noise):
    setup = Setup(1000)
    big = noise * 3  # x0 predictions well outside [-1, 1], so the threshold acts
    # diffusers clamps s to [1, sample_max_value]; the official rule is s = max(s, 1): a huge max gives it
    sched = setup.scheduler(
        diffusers.DPMSolverMultistepScheduler,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        thresholding=True,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1e9,
    )
    labels = setup.labels(27, "time_uniform")
    sched.set_timesteps(timesteps=labels)
    setup.to_float64(sched, "zero")
    ref = setup.run(sched, big)
    kw = dict(
        steps=27, skip_type="time_uniform", solver="dpmsolver++", order=2, denoise_to_zero=True
    )
    res = sample(setup.pdm_model(), big, setup.schedule, thresholding=True, **kw)
    plain = sample(setup.pdm_model(), big, setup.schedule, **kw)
    assert rel(res.x, ref) < FLOAT32_REFERENCE
    assert rel(plain.x, ref) > 1e-3


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_diffusers(noise, steps):
    setup = Setup(1000)
    sched = setup.scheduler(diffusers.DDIMScheduler, clip_sample=False, set_alpha_to_one=True)
    sched.alphas_cumprod = setup.alphas_cumprod  # float64
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(steps)
    ref = setup.run(sched, noise)
    grid = (sched.timesteps.double() + 1) / setup.n
    res = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        timesteps=grid,
        denoise_to_zero=True,
        solver="ddim",
    )
    assert rel(res.x, ref) < EXACT


def test_parity_fails_for_a_wrong_order(noise):
    # the comparison can fail: 2M against diffusers' 3M differs well above the tolerance
    setup = Setup(1000)
    sched = setup.scheduler(
        diffusers.DPMSolverMultistepScheduler, solver_order=3, final_sigmas_type="zero"
    )
    sched.set_timesteps(20)
    setup.to_float64(sched, "zero")
    ref = setup.run(sched, noise)
    res = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        timesteps=(sched.timesteps.double() + 1) / setup.n,
        denoise_to_zero=True,
        solver="dpmsolver++",
        order=2,
    )
    assert rel(res.x, ref) > 1e-4


# --- singlestep DPM-Solver(++) ----------------------------------------------------------------------------

# (schedule size, steps): pdm's grids land on integers (N - 1 divisible by steps; N = q^2 with
# q - 1 divisible by steps for time_quadratic), and diffusers' order list equals DPM-Solver-fast's.
SINGLESTEP_DATA = {
    2: (441, 20),
    3: (441, 20),
}  # data form ends with the sigma = 0 step (pdm: denoise_to_zero)
SINGLESTEP_NOISE = {2: (484, 21), 3: (484, 21)}  # noise form ends at sigma_min


@pytest.mark.parametrize("skip_type", ["time_uniform", "time_quadratic"])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order, solver_type", [(2, "midpoint"), (2, "heun"), (3, "heun")])
def test_singlestep_on_pdm_grids_matches_diffusers(noise, skip_type, algorithm, order, solver_type):
    data = algorithm == "dpmsolver++"
    n, steps = (SINGLESTEP_DATA if data else SINGLESTEP_NOISE)[order]
    setup = Setup(n)
    final = "zero" if data else "sigma_min"
    sched = setup.scheduler(
        diffusers.DPMSolverSinglestepScheduler,
        algorithm_type=algorithm,
        solver_order=order,
        solver_type=solver_type,
        final_sigmas_type=final,
        lower_order_final=True,
    )
    labels = setup.labels(steps, skip_type)
    sched.set_timesteps(timesteps=labels if data else labels[:-1])
    setup.to_float64(sched, final)
    ref = setup.run(sched, noise)
    res = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        steps=steps,
        skip_type=skip_type,
        solver=algorithm,
        order=order,
        solver_type=solver_type,
        method="singlestep",
        denoise_to_zero=data,
    )
    assert rel(res.x, ref) < EXACT


@pytest.mark.parametrize("skip_type", ["time_uniform", "time_quadratic", "logSNR"])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order, solver_type", [(2, "dpmsolver"), (3, "dpmsolver"), (3, "taylor")])
@pytest.mark.parametrize("steps", [10, 11])
def test_singlestep_matches_the_official_algorithm_on_every_grid(
    noise, skip_type, algorithm, order, solver_type, steps
):
    # diffusers' third-order "midpoint" variant reaches the second intermediate point with a
    # midpoint step where the official DPM-Solver-3 uses the phi_2 form, and it has no logSNR
    # inner points: the reference here is a NumPy transcription of the official algorithm.
    setup = Setup(1000)
    ref_sched = RefSchedule(setup.betas.numpy())

    def eps_np(x, t):
        return eps_of_label(
            torch.from_numpy(x),
            torch.full((x.shape[0],), (t - 1 / setup.n) * setup.n, dtype=torch.float64),
        ).numpy()

    ref = singlestep_sample(
        eps_np,
        noise.numpy(),
        ref_sched,
        steps,
        order,
        skip_type,
        algorithm == "dpmsolver++",
        solver_type,
    )
    res = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        steps=steps,
        skip_type=skip_type,
        solver=algorithm,
        order=order,
        solver_type=solver_type,
        method="singlestep",
    )
    assert res.nfe == steps
    assert rel(res.x, torch.from_numpy(ref)) < 1e-10


def test_singlestep_reference_tells_time_uniform_inner_points_from_logsnr_ones(noise):
    # the bug this guards against: r1 = 1/2 in lambda on a time-uniform grid (relative error ~1e-2)
    setup = Setup(1000)
    ref_sched = RefSchedule(setup.betas.numpy())

    def eps_np(x, t):
        return eps_of_label(
            torch.from_numpy(x),
            torch.full((x.shape[0],), (t - 1 / setup.n) * setup.n, dtype=torch.float64),
        ).numpy()

    uniform = singlestep_sample(
        eps_np, noise.numpy(), ref_sched, 10, 3, "time_uniform", True, "dpmsolver"
    )
    res = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        steps=10,
        skip_type="time_uniform",
        solver="dpmsolver++",
        order=3,
        method="singlestep",
    )
    assert rel(res.x, torch.from_numpy(uniform)) < 1e-10
    fine = setup.schedule.timesteps(10, "time_uniform")
    outer = fine[torch.tensor([0, 3, 6, 9, 10])]
    lambda_middle = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        steps=10,
        timesteps=outer,
        solver="dpmsolver++",
        order=3,
        method="singlestep",
        skip_type="logSNR",
    )
    assert rel(lambda_middle.x, torch.from_numpy(uniform)) > 1e-4


# --- UniPC -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [9, 27])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_on_pdm_time_uniform_grid_matches_diffusers(noise, steps, order, variant):
    # diffusers' "linspace" spacing with a sigma_min end is pdm's time_uniform grid when 999 / steps is whole
    setup = Setup(1000)
    sched = setup.scheduler(
        diffusers.UniPCMultistepScheduler,
        solver_order=order,
        solver_type=variant,
        final_sigmas_type="sigma_min",
        timestep_spacing="linspace",
        lower_order_final=True,
    )
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == setup.labels(steps, "time_uniform")[:-1]
    setup.to_float64(sched, "sigma_min")
    ref = setup.run(sched, noise)
    res = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        steps=steps,
        skip_type="time_uniform",
        solver="unipc",
        order=order,
        solver_type=variant,
    )
    assert res.nfe == steps
    assert rel(res.x, ref) < EXACT


def test_unipc_corrector_changes_the_sample_at_no_extra_cost(noise):
    setup = Setup(1000)
    calls = []

    def counting(x, t):
        calls.append(1)
        return setup.pdm_model()(x, t)

    unipc = sample(counting, noise, setup.schedule, steps=9, solver="unipc", order=2)
    assert len(calls) == 9 == unipc.nfe
    dpm = sample(setup.pdm_model(), noise, setup.schedule, steps=9, solver="dpmsolver++", order=2)
    assert rel(unipc.x, dpm.x) > 1e-4


# --- DDPM --------------------------------------------------------------------------------------------------


def test_ddpm_ancestral_sampler_matches_diffusers_with_the_same_noise(noise):
    setup = Setup(1000)
    sched = setup.scheduler(diffusers.DDPMScheduler, clip_sample=False)
    sched.alphas_cumprod, sched.betas, sched.alphas = (
        setup.alphas_cumprod,
        setup.betas,
        1 - setup.betas,
    )
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(timesteps=setup.labels(27, "time_uniform"))
    ref = setup.run(sched, noise, generator=torch.Generator().manual_seed(5))
    res = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        steps=27,
        solver="ddpm",
        skip_type="time_uniform",
        denoise_to_zero=True,
        generator=torch.Generator().manual_seed(5),
    )
    # diffusers adds noise of std 1e-10 (its variance floor) on the final, noise-free step
    assert float((res.x - ref).abs().max()) < 1e-8


def test_ddpm_adds_no_noise_on_its_final_step(noise):
    setup = Setup(1000)
    a = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        steps=1,
        solver="ddpm",
        generator=torch.Generator().manual_seed(1),
    )
    b = sample(
        setup.pdm_model(),
        noise,
        setup.schedule,
        steps=1,
        solver="ddpm",
        generator=torch.Generator().manual_seed(2),
    )
    assert torch.equal(a.x, b.x)  # one step, the final one: no draw, whatever the generator
