"""``sample``: every solver behind one function of (model_fn, noise, schedule, settings).

The model function sees only (x, t, **model_kwargs) with t a (batch,) tensor of continuous
times and returns the prediction named by ``prediction``. The update maths runs in the
noise's dtype; the model's output is cast to it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pdm.objectives import Target
from pdm.sampling.catalog import (
    ALL_METHODS,
    CorrectedSolver,
    MultistepSolver,
    StepOptions,
    solver_spec,
)
from pdm.sampling.evaluator import ModelEvaluator, Thresholding
from pdm.sampling.methods import StepInfo, adaptive_step_size, multistep, singlestep
from pdm.sampling.per_image import per_image
from pdm.sampling.settings import Settings
from pdm.sampling.skipper import Skipper
from pdm.sampling.solvers import TimePoint, singlestep_orders
from pdm.schedule import VPSchedule

METHODS: tuple[str, ...] = ALL_METHODS


@dataclass
class SampleResult:
    """What a sampling run produced.

    ``evaluated[i, b]`` tells whether the network ran for sample b during step i (a row per
    solver step; a singlestep step may hold several evaluations). ``nfe`` is the mean number
    of network evaluations per sample and ``nfe_per_sample`` the counts.
    """

    x: Tensor
    nfe: float
    evaluated: Tensor
    nfe_per_sample: Tensor
    timesteps: Tensor


def sample(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    settings: Settings | None = None,
    *,
    prediction: Target = "eps",
    model_kwargs: dict[str, Tensor] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    **keywords: Any,
) -> SampleResult:
    """Integrate the diffusion ODE (or the DDPM chain) from ``noise`` at t_start to t_end.

    Args:
        model_fn: ``model_fn(x, t, **model_kwargs)`` with t of shape (batch,), returning ``prediction``.
        noise: x at t_start, usually standard normal; its dtype is the solver's.
        schedule: the VP schedule the model was trained with.
        settings: the sampler (:class:`~pdm.sampling.settings.Settings`; None: ``Settings()``, the
            project's default); a learned schedule gives its own
            (:meth:`~pdm.sampling.learned.LearnedSchedule.settings_for`).
        prediction: what the model returns, ``eps``, ``x0`` or ``v``.
        model_kwargs: per-sample tensors (e.g. class labels ``y``) passed to the model; they are
            sliced together with x when only some samples are evaluated.
        callback: ``callback(info)`` once per step, as k-diffusion's samplers do: a
            :class:`~pdm.sampling.methods.StepInfo` with the step index ``i``, its start time ``t``,
            the state ``x`` there, the x0 prediction ``info.x0`` and the ``evaluated`` rows.
        **keywords: the keyword form: any field of ``Settings`` (``skip_type`` and ``solver_type``
            name ``grid`` and ``variant``), over ``settings``; and two run options, ``generator``
            (DDPM's noise) and ``progress`` (a progress bar).
    """
    generator, progress = keywords.pop("generator", None), keywords.pop("progress", False)
    s = Settings.from_keywords(settings, **keywords).resolved(prediction)
    batch, device = noise.shape[0], noise.device
    grid = _grid(schedule, s, noise.dtype, device)
    if s.teleport is not None:  # noise is x at t_max; the teleport carries it to the grid's start
        noise = s.teleport(noise, schedule, float(grid[0]), (model_kwargs or {}).get("y"))
    kwargs = _check_model_kwargs(model_kwargs, batch)
    clamp = Thresholding(s.threshold_ratio, s.threshold_max) if s.thresholding else None
    evaluate = ModelEvaluator(
        model_fn, prediction, solver_spec(s.solver).data, kwargs, clamp, batch, device
    )
    controller = Skipper(s.skip, batch, device, evaluate.convert)
    steps = None if s.method in ("adaptive", "per_image") else grid.numel() - 1
    with _reporting(steps, progress, callback) as on_step:
        x, rows, grid = _integrate(
            noise, grid, schedule, s, evaluate, controller, generator, on_step
        )
    if s.denoise_to_zero:
        x = evaluate.data_prediction(x, TimePoint.at(schedule, grid[-1]))
    blank = torch.zeros(batch, dtype=torch.bool, device=device)
    evaluated = torch.stack(rows) if rows else blank[None][:0]
    nfe = float(evaluate.nfe.double().mean())
    return SampleResult(x, nfe, evaluated, evaluate.nfe.clone(), grid)


def _integrate(
    x: Tensor,
    grid: Tensor,
    schedule: VPSchedule,
    s: Settings,
    evaluate: ModelEvaluator,
    controller: Skipper,
    generator: torch.Generator | None,
    on_step: Callable[[StepInfo], None],
) -> tuple[Tensor, list[Tensor], Tensor]:
    """The run of ``s.method`` along ``grid``: (x at its end, evaluated rows, the grid taken)."""
    variant = s.variant or "dpmsolver"
    if s.method == "adaptive":
        return adaptive_step_size(x, grid[0], grid[-1], schedule, evaluate, s, on_step)
    if s.method == "per_image":
        x = per_image(x, evaluate, schedule, s, grid, lambda rounds: on_step(None))
        return x, [], grid[[0, -1]]
    if s.method == "multistep":
        points = [TimePoint.at(schedule, t) for t in grid]
        stepper = multistep_solver(s, schedule, generator)
        return (*multistep(x, points, stepper, evaluate, controller, on_step), grid)
    return _singlestep(x, schedule, grid, s, evaluate, controller, variant, on_step)


def multistep_solver(
    s: Settings, schedule: VPSchedule | None = None, generator: torch.Generator | None = None
) -> MultistepSolver:
    """The multistep step object of ``s.solver`` (its catalog row's ``build``) for resolved
    settings ``s``, with its learned per-step corrections when it has them."""
    options = StepOptions(
        s.order,
        s.lower_order_final,
        s.variant or "dpmsolver",
        schedule,
        generator,
        s.denoise_to_zero,
    )
    stepper = solver_spec(s.solver).build(options)
    return CorrectedSolver(stepper, s.corrections) if s.corrections else stepper


@contextmanager
def _reporting(total: int | None, progress: bool, callback: Callable[[StepInfo], None] | None):
    """The per-step hook of a run: the progress bar's tick, then the caller's ``callback``."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="sampling", leave=False, disable=not progress) as bar:

        def on_step(info: StepInfo | None) -> None:
            bar.update()
            if callback is not None and info is not None:  # per-image rounds are not steps
                callback(info)

        yield on_step


def _check_model_kwargs(model_kwargs: dict[str, Tensor] | None, batch: int) -> dict[str, Tensor]:
    kwargs = dict(model_kwargs or {})
    for k, v in kwargs.items():
        if v.shape[0] != batch:
            raise ValueError(f"model_kwargs[{k!r}] has {v.shape[0]} rows for a batch of {batch}")
    return kwargs


def _grid(schedule: VPSchedule, s: Settings, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The run's time grid: ``s.timesteps`` when given, else ``s.steps`` steps of ``s.grid``."""
    if s.timesteps is None:
        return schedule.timesteps(s.steps, s.grid, s.t_start, s.t_end, dtype=dtype, device=device)
    grid = torch.tensor(s.timesteps, dtype=torch.float64).to(dtype=dtype, device=device)
    if grid.numel() < 2 or not bool((grid.diff() < 0).all()):
        raise ValueError("timesteps must be a decreasing sequence of at least 2 times")
    if not bool(torch.isfinite(grid).all()) or float(grid[-1]) <= 0:
        raise ValueError("timesteps must be finite and positive")
    return grid


def _singlestep(
    x: Tensor,
    schedule: VPSchedule,
    grid: Tensor,
    s: Settings,
    evaluate: ModelEvaluator,
    controller: Skipper,
    variant: str,
    progress: Callable[[StepInfo], None],
) -> tuple[Tensor, list[Tensor], Tensor]:
    """The official singlestep grids: outer steps and, inside each, points spaced like ``s.grid``.

    DPM-Solver-fast (``singlestep``) splits ``steps`` evaluations into orders summing to
    ``steps``; its outer grid is the fine ``steps``-grid taken at the cumulative orders (for
    ``logSNR`` it is a grid of its own, as in the paper). ``singlestep_fixed`` takes
    ``steps // order`` steps of one order. The intermediate points of a step [s, t] are the
    inner grid of ``order`` sub-intervals built with the grid's kind (r = 1/2, 1/3, 2/3 holds
    only for logSNR), as the official code does.
    """
    own_grid, kind = s.timesteps is None, s.grid
    if s.method == "singlestep":
        orders = singlestep_orders(s.steps, s.order)
        if own_grid and kind == "logSNR":
            grid = schedule.timesteps(
                len(orders), kind, float(grid[0]), float(grid[-1]), grid.dtype, grid.device
            )
        elif own_grid:
            cum = torch.cumsum(torch.tensor([0] + orders), 0).to(grid.device)
            grid = grid[cum]
    else:
        orders = [s.order] * (s.steps // s.order)
        if own_grid:
            grid = schedule.timesteps(
                len(orders), kind, float(grid[0]), float(grid[-1]), grid.dtype, grid.device
            )
    if grid.numel() != len(orders) + 1:
        raise ValueError(
            f"a singlestep run of {len(orders)} steps needs {len(orders) + 1} timesteps, got {grid.numel()}"
        )
    outer = [TimePoint.at(schedule, t) for t in grid]
    inner = []
    for k, step_order in enumerate(orders):
        sub = schedule.timesteps(
            step_order, kind, float(grid[k]), float(grid[k + 1]), grid.dtype, grid.device
        )
        inner.append([TimePoint.at(schedule, t) for t in sub[1:-1]])
    x, rows = singlestep(x, outer, inner, orders, evaluate, controller, variant, progress)
    return x, rows, grid
