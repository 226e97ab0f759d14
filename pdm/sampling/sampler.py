"""``sample``: every solver behind one function of (model_fn, noise, schedule).

The model function sees only (x, t, **model_kwargs) with t a (batch,) tensor of continuous
times; it returns the prediction named by ``prediction``. The update maths runs in the
noise's dtype; the model's output is cast to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pdm.objectives import TARGETS, to_eps, to_x0
from pdm.sampling.guidance import dynamic_threshold
from pdm.sampling.skipping import AdaptiveSkip, SkipController, SkipPath
from pdm.sampling.solvers import (
    Coefficients,
    canonical_solver_type,
    first_order_update,
    multistep_second_update,
    multistep_third_update,
    singlestep_orders,
    singlestep_update,
)
from pdm.schedule import SKIP_TYPES, VPSchedule

SOLVERS = ("ddim", "ddpm", "dpmsolver", "dpmsolver++")
METHODS = ("multistep", "singlestep", "singlestep_fixed", "adaptive")


@dataclass
class SampleResult:
    """What a sampling run produced.

    ``evaluated[i, b]`` tells whether the network ran for sample b during step i (a row per
    solver step; for singlestep methods a step may hold several evaluations). ``nfe`` is
    the mean number of network evaluations per sample and ``nfe_per_sample`` the counts.
    """

    x: Tensor
    nfe: float
    evaluated: Tensor
    nfe_per_sample: Tensor
    timesteps: Tensor


class _Evaluator:
    """Calls the network for the samples that need it and converts outputs at (x, t)."""

    def __init__(self, model_fn: Callable[..., Tensor], prediction: str, batch: int, model_kwargs: dict[str, Tensor],
                 thresholding: bool, threshold_ratio: float, threshold_max: float, device: torch.device) -> None:
        self.model_fn = model_fn
        self.prediction = prediction
        self.model_kwargs = model_kwargs
        self.thresholding = thresholding
        self.threshold_ratio = threshold_ratio
        self.threshold_max = threshold_max
        self.cache: Tensor | None = None  # last raw network output of every sample
        self.nfe = torch.zeros(batch, dtype=torch.long, device=device)
        self.step_evaluated = torch.zeros(batch, dtype=torch.bool, device=device)

    def raw(self, x: Tensor, c: Coefficients, mask: Tensor | None) -> Tensor:
        batch = x.shape[0]
        if mask is None or self.cache is None or bool(mask.all()):
            t = c.t.expand(batch).to(x.dtype)
            out = self.model_fn(x, t, **self.model_kwargs).to(x.dtype)
            self.nfe += 1
            self.step_evaluated[:] = True
        else:
            idx = torch.nonzero(mask).flatten()
            out = self.cache.clone()
            if idx.numel():
                t = c.t.expand(idx.numel()).to(x.dtype)
                out[idx] = self.model_fn(x[idx], t, **{k: v[idx] for k, v in self.model_kwargs.items()}).to(x.dtype)
                self.nfe[idx] += 1
                self.step_evaluated[idx] = True
        self.cache = out
        return out

    def data(self, x: Tensor, c: Coefficients, mask: Tensor | None = None) -> Tensor:
        x0 = to_x0(self.raw(x, c, mask), x, c.alpha, c.sigma, self.prediction)
        if self.thresholding:
            x0 = dynamic_threshold(x0, self.threshold_ratio, self.threshold_max)
        return x0

    def noise(self, x: Tensor, c: Coefficients, mask: Tensor | None = None) -> Tensor:
        if self.thresholding:
            return to_eps(self.data(x, c, mask), x, c.alpha, c.sigma, "x0")
        return to_eps(self.raw(x, c, mask), x, c.alpha, c.sigma, self.prediction)


def _validate(solver: str, method: str, order: int, steps: int, skip_type: str, prediction: str) -> None:
    """Raise a ValueError naming the fix for any unusable combination of sampler settings."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(SKIP_TYPES)}")
    if prediction not in TARGETS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(TARGETS)}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if method == "singlestep_fixed" and steps < order:
        raise ValueError(f"singlestep_fixed of order {order} needs at least {order} steps, got {steps}; raise --steps or lower --order")
    if method == "adaptive" and order not in (2, 3):
        raise ValueError("the adaptive method is DPM-Solver-12 or -23: use order 2 or 3")


def sample(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    steps: int = 20,
    solver: str = "dpmsolver++",
    order: int = 2,
    method: str = "multistep",
    skip_type: str = "time_uniform",
    prediction: str = "eps",
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    t_start: float | None = None,
    t_end: float | None = None,
    timesteps: Tensor | None = None,
    skip: AdaptiveSkip | SkipPath | None = None,
    solver_type: str = "dpmsolver",
    thresholding: bool = False,
    threshold_ratio: float = 0.995,
    threshold_max: float = 1.0,
    model_kwargs: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    atol: float = 0.0078,
    rtol: float = 0.05,
    h_init: float = 0.05,
    progress: bool = False,
) -> SampleResult:
    """Integrate the diffusion ODE (or the DDPM chain) from ``noise`` at t_start to t_end.

    Args:
        model_fn: ``model_fn(x, t, **model_kwargs)`` with t of shape (batch,).
        noise: x at t_start, usually standard normal; its dtype is the solver's.
        schedule: the VP schedule the model was trained with.
        steps: solver steps (multistep) or network evaluations (singlestep, adaptive aside).
        solver: ``ddim``, ``ddpm`` (ancestral), ``dpmsolver`` (noise form), ``dpmsolver++`` (data form).
        order: 1-3 for the DPM-Solvers; DDIM and DDPM are first order.
        method: ``multistep``, ``singlestep`` (DPM-Solver-fast), ``singlestep_fixed`` or ``adaptive``.
        skip_type: time grid, unless ``timesteps`` (decreasing, steps + 1 values) is given.
        prediction: what the model returns, ``eps``, ``x0`` or ``v``.
        lower_order_final: lower the order of the last steps when steps < 10 (official rule).
        denoise_to_zero: finish with x = x0(x, t_end), one more evaluation (diffusers' sigma=0 end).
        skip: :class:`AdaptiveSkip` settings, a fixed :class:`SkipPath`, or None to evaluate every step.
        solver_type: ``dpmsolver`` (midpoint) or ``taylor`` (heun) for second-order corrections.
        thresholding: dynamic thresholding of x0 at ``threshold_ratio``, floor ``threshold_max``.
        model_kwargs: per-sample tensors (e.g. class labels ``y``) passed to the model;
            they are sliced together with x when only some samples are evaluated.
        generator: random source for the DDPM ancestral noise.
        atol, rtol, h_init: tolerances and first step (in lambda) of the adaptive method.
        progress: show a progress bar.
    """
    _validate(solver, method, order, steps, skip_type, prediction)
    solver_type = canonical_solver_type(solver_type)
    if skip is not None and method == "adaptive":
        raise ValueError("adaptive step skipping cannot be combined with the adaptive step-size method; use multistep or singlestep")
    batch, device = noise.shape[0], noise.device
    dtype = noise.dtype
    if timesteps is not None:
        grid = torch.as_tensor(timesteps, dtype=dtype, device=device).flatten()
        if grid.numel() < 2 or not bool((grid.diff() < 0).all()):
            raise ValueError("timesteps must be a decreasing sequence of at least 2 times")
        steps = grid.numel() - 1
    else:
        grid = schedule.timesteps(steps, skip_type, t_start, t_end, dtype=dtype, device=device)
    kwargs = dict(model_kwargs or {})
    for k, v in kwargs.items():
        if v.shape[0] != batch:
            raise ValueError(f"model_kwargs[{k!r}] has {v.shape[0]} rows for a batch of {batch}")
    ev = _Evaluator(model_fn, prediction, batch, kwargs, thresholding, threshold_ratio, threshold_max, device)
    ctrl = SkipController(skip, batch, device)
    data = solver in ("ddim", "ddpm", "dpmsolver++")
    model_at = ev.data if data else ev.noise
    rows: list[Tensor] = []
    bar = _progress(progress)

    def coeffs(t: Tensor) -> Coefficients:
        return Coefficients(schedule, t)

    x = noise
    ctrl.start(x)
    if method == "adaptive":
        x, used = _adaptive(x, grid[0], grid[-1], order, ev, model_at, schedule, data, solver_type, atol, rtol, h_init)
        rows = [torch.ones(batch, dtype=torch.bool, device=device)] * int(ev.nfe[0].item())
        grid = used
    elif method == "multistep" or solver in ("ddim", "ddpm"):
        eff_order = 1 if solver in ("ddim", "ddpm") else order
        prev_c = [coeffs(grid[0])]
        ev.step_evaluated.zero_()
        hist = [model_at(x, prev_c[0], ctrl.mask())]
        for i in range(1, steps + 1):
            step_order = min(eff_order, i)
            if lower_order_final and steps < 10:
                step_order = min(step_order, steps + 1 - i)
            c_t = coeffs(grid[i])
            if solver == "ddpm":
                x = _ddpm_step(x, prev_c[-1], c_t, hist[-1], generator)
            elif step_order == 1:
                x = first_order_update(x, prev_c[-1], c_t, hist[-1], data)
            elif step_order == 2:
                x = multistep_second_update(x, prev_c, c_t, hist, data, solver_type)
            else:
                x = multistep_third_update(x, prev_c, c_t, hist, data)
            rows.append(ev.step_evaluated.clone())
            ctrl.observe(x, ev.step_evaluated)
            bar(i, steps)
            if i < steps:
                ev.step_evaluated.zero_()
                hist.append(model_at(x, c_t, ctrl.mask()))
                prev_c.append(c_t)
                hist, prev_c = hist[-eff_order:], prev_c[-eff_order:]
    else:
        if method == "singlestep":
            orders = singlestep_orders(steps, order)
            if timesteps is None and skip_type != "logSNR":
                fine = schedule.timesteps(steps, skip_type, t_start, t_end, dtype=dtype, device=device)
                cum = torch.cumsum(torch.tensor([0] + orders), 0)
                grid = fine[cum.to(device)]
            elif timesteps is None:
                grid = schedule.timesteps(len(orders), skip_type, t_start, t_end, dtype=dtype, device=device)
        else:
            orders = [order] * (steps // order)
            if timesteps is None:
                grid = schedule.timesteps(len(orders), skip_type, t_start, t_end, dtype=dtype, device=device)
        if grid.numel() != len(orders) + 1:
            raise ValueError(f"a singlestep run of {len(orders)} steps needs {len(orders) + 1} timesteps, got {grid.numel()}")
        for k, step_order in enumerate(orders):
            mask = ctrl.mask()
            ev.step_evaluated.zero_()

            def masked(x_: Tensor, c: Coefficients, _mask: Tensor = mask) -> Tensor:
                return model_at(x_, c, _mask)

            x = singlestep_update(x, coeffs(grid[k]), coeffs(grid[k + 1]), step_order, masked, schedule, data, solver_type)
            rows.append(ev.step_evaluated.clone())
            ctrl.observe(x, ev.step_evaluated)
            bar(k + 1, len(orders))
    if denoise_to_zero:
        ev.step_evaluated.zero_()
        x = ev.data(x, coeffs(grid[-1]))
    bar(None, None)
    evaluated = torch.stack(rows) if rows else torch.zeros(0, batch, dtype=torch.bool, device=device)
    return SampleResult(x=x, nfe=float(ev.nfe.double().mean()), evaluated=evaluated, nfe_per_sample=ev.nfe.clone(),
                        timesteps=grid)


def _ddpm_step(x: Tensor, s: Coefficients, t: Coefficients, x0: Tensor, generator: torch.Generator | None) -> Tensor:
    """One ancestral step from s to t < s: a draw from q(x_t | x_s, x0) with the predicted x0.

    With alpha_{s|t} = alpha_s / alpha_t and sigma2_{s|t} = sigma_s^2 - alpha_{s|t}^2 sigma_t^2,
    the posterior has mean (alpha_{s|t} sigma_t^2 x_s + alpha_t sigma2_{s|t} x0) / sigma_s^2 and
    variance sigma2_{s|t} sigma_t^2 / sigma_s^2 (Ho et al. 2020, eq. 7; Kingma et al. 2021).
    """
    alpha_st = s.alpha / t.alpha
    var_st = s.sigma**2 - alpha_st**2 * t.sigma**2
    mean = (alpha_st * t.sigma**2 * x + t.alpha * var_st * x0) / s.sigma**2
    var = (var_st * t.sigma**2 / s.sigma**2).clamp(min=0)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + var.sqrt() * z


def _adaptive(x: Tensor, t_T: Tensor, t_0: Tensor, order: int, ev: _Evaluator, model_at: Callable, schedule: VPSchedule,
              data: bool, solver_type: str, atol: float, rtol: float, h_init: float) -> tuple[Tensor, Tensor]:
    """DPM-Solver-12 / -23 with step-size control (Lu et al. 2022, Sec. 4.2 and App. C).

    A lower- and a higher-order step share their first evaluations; the scaled difference
    accepts or rejects the step, and the next step in lambda is theta * h * E^(-1/order).
    Rejected tries count as network evaluations.
    """
    theta, t_err = 0.9, 1e-5
    s = t_T
    lam_s, lam_0 = schedule.lambda_(s), schedule.lambda_(t_0)
    h = torch.full_like(lam_s, h_init)
    x_prev = x
    used = [s.clone()]
    while float((s - t_0).abs()) > t_err:
        t = schedule.t_of_lambda(lam_s + h)
        c_s, c_t = Coefficients(schedule, s), Coefficients(schedule, t)
        # DPM-Solver-12 pairs orders 1 and 2; DPM-Solver-23 pairs 2 (at r1 = 1/3) and 3, so the
        # higher-order try reuses every evaluation of the lower one: `order` evaluations a try.
        x_lower, outs = singlestep_update(x, c_s, c_t, order - 1, model_at, schedule, data, solver_type,
                                          return_intermediate=True, r1=1.0 / 3.0 if order == 3 else None)
        x_higher = singlestep_update(x, c_s, c_t, order, model_at, schedule, data, solver_type, reuse=outs)
        delta = torch.maximum(torch.full_like(x_lower, atol), rtol * torch.maximum(x_lower.abs(), x_prev.abs()))
        err = ((x_higher - x_lower) / delta).flatten(1).pow(2).mean(dim=1).sqrt().max()
        if bool(err <= 1.0):
            x, s, x_prev = x_higher, t, x_lower
            lam_s = schedule.lambda_(s)
            used.append(s.clone())
        h = torch.minimum(theta * h * err.clamp(min=1e-12) ** (-1.0 / order), lam_0 - lam_s)
    return x, torch.stack(used)


def _progress(enabled: bool) -> Callable[[int | None, int | None], None]:
    if not enabled:
        return lambda i, n: None
    from tqdm.auto import tqdm

    state: dict = {}

    def update(i: int | None, n: int | None) -> None:
        if i is None:
            if "bar" in state:
                state["bar"].close()
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=n, desc="sampling", leave=False)
        state["bar"].update(1)

    return update
