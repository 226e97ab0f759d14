"""``sample``: every solver behind one function of (model_fn, noise, schedule).

The model function sees only (x, t, **model_kwargs) with t a (batch,) tensor of continuous
times and returns the prediction named by ``prediction``. The update maths runs in the
noise's dtype; the model's output is cast to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pdm.objectives import TARGETS, Target
from pdm.sampling.coefficients import CorrectedSolver
from pdm.sampling.evaluator import ModelEvaluator, Thresholding
from pdm.sampling.methods import StepInfo, adaptive_step_size, multistep, singlestep
from pdm.sampling.skipper import Skipper
from pdm.sampling.skipping import AdaptiveSkip, SkipPath
from pdm.sampling.catalog import ALL_METHODS, SOLVERS, VARIANT_ALIASES, MultistepSolver, StepOptions, solver_spec
from pdm.sampling.solvers import TimePoint, singlestep_orders
from pdm.schedule import SKIP_TYPES, SkipType, VPSchedule

Solver = str  # a name in catalog.SOLVERS (the table is the one list of solvers)
Method = Literal["multistep", "singlestep", "singlestep_fixed", "adaptive"]
SolverType = Literal["dpmsolver", "taylor", "midpoint", "heun", "bh1", "bh2"]
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


def check_settings(solver: str = "dpmsolver++", method: str = "multistep", order: int = 2, steps: int = 20,
                   skip_type: str = "time_uniform", prediction: str = "eps", solver_type: str | None = None) -> str:
    """Raise a ValueError naming the fix for any unusable combination; return the solver_type to use."""
    spec = solver_spec(solver)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method not in spec.methods:
        owners = [name for name in SOLVERS if method in solver_spec(name).methods]
        raise ValueError(f"method {method!r} exists only for {' and '.join(owners)}; {solver} is multistep")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(SKIP_TYPES)}")
    if prediction not in TARGETS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(TARGETS)}")
    orders = spec.orders
    if spec.first_order:
        order = 1  # first-order samplers: the order argument does not apply
    elif order not in orders:
        raise ValueError(f"order must be {', '.join(map(str, orders[:-1]))} or {orders[-1]} for {solver}, got {order}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if method == "singlestep_fixed" and steps < order:
        raise ValueError(f"singlestep_fixed of order {order} needs at least {order} steps, got {steps}; "
                         "raise --steps or lower --order")
    if method == "adaptive" and order not in (2, 3):
        raise ValueError("the adaptive method is DPM-Solver-12 or -23: use order 2 or 3")
    if not spec.variants:  # no variants: a DPM-Solver variant name is accepted and ignored
        if solver_type not in (None, *solver_spec("dpmsolver").variants, *VARIANT_ALIASES):
            raise ValueError(f"solver_type {solver_type!r} does not apply to {solver}; leave it unset")
        return "dpmsolver"
    if solver_type is None:
        return spec.variants[0]
    canonical = VARIANT_ALIASES.get(solver_type, solver_type) if "dpmsolver" in spec.variants else solver_type
    if canonical not in spec.variants:
        raise ValueError(f"unknown solver_type {solver_type!r} for {solver}; choose one of {', '.join(spec.variants)}")
    return canonical


def multistep_solver(solver: str, order: int, solver_type: str, lower_order_final: bool,
                     generator: torch.Generator | None, denoise_to_zero: bool = False,
                     schedule: VPSchedule | None = None, corrections: Sequence[float] | None = None) -> MultistepSolver:
    """The multistep step object of a solver (its catalog row's ``build``), with learned
    per-step ``corrections`` when given."""
    options = StepOptions(order, lower_order_final, solver_type, schedule, generator, denoise_to_zero)
    stepper = solver_spec(solver).build(options)
    return CorrectedSolver(stepper, corrections) if corrections else stepper


def _check_method_options(method: str, skip, corrections: Sequence[float] | None) -> None:
    if corrections and method != "multistep":
        raise ValueError("learned corrections apply to the multistep method only")
    if skip is not None and method == "adaptive":
        raise ValueError("step skipping cannot be combined with the adaptive step-size method; use multistep or singlestep")


def sample(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    steps: int = 20,
    solver: Solver = "dpmsolver++",
    order: int = 2,
    method: Method = "multistep",
    skip_type: SkipType = "time_uniform",
    prediction: Target = "eps",
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    t_start: float | None = None,
    t_end: float | None = None,
    timesteps: Tensor | None = None,
    skip: AdaptiveSkip | SkipPath | None = None,
    solver_type: SolverType | None = None,
    thresholding: bool = False,
    threshold_ratio: float = 0.995,
    threshold_max: float = 1.0,
    model_kwargs: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    atol: float = 0.0078,
    rtol: float = 0.05,
    h_init: float = 0.05,
    progress: bool = False,
    callback: Callable[[StepInfo], None] | None = None,
    corrections: Sequence[float] | None = None,
    teleport: Callable[..., Tensor] | None = None,
) -> SampleResult:
    """Integrate the diffusion ODE (or the DDPM chain) from ``noise`` at t_start to t_end.

    Args:
        model_fn: ``model_fn(x, t, **model_kwargs)`` with t of shape (batch,).
        noise: x at t_start, usually standard normal; its dtype is the solver's.
        schedule: the VP schedule the model was trained with.
        steps: solver steps (multistep) or network evaluations (singlestep, adaptive aside).
        solver: a row of :data:`pdm.sampling.catalog.SOLVER_TABLE`: ``ddim``, ``ddpm`` (ancestral),
            ``dpmsolver`` (noise form), ``dpmsolver++`` (data form), ``unipc`` (UniPC, data form),
            ``ipndm`` (iPNDM, noise form) or ``deis`` (tAB-DEIS, noise form).
        order: 1-3 (iPNDM: 1-4); DDIM and DDPM are first order.
        method: ``multistep``, ``singlestep`` (DPM-Solver-fast), ``singlestep_fixed`` or
            ``adaptive``; the last three exist for dpmsolver / dpmsolver++.
        skip_type: time grid (``time_uniform``, ``logSNR``, ``time_quadratic``, ``edm``), unless
            ``timesteps`` (decreasing, steps + 1 values) is given.
        prediction: what the model returns, ``eps``, ``x0`` or ``v``.
        lower_order_final: lower the order of the last steps as each solver's official code does
            (DPM-Solver when steps < 10, UniPC always; iPNDM and DEIS never do).
        denoise_to_zero: finish with x = x0(x, t_end), one more evaluation (diffusers' sigma=0 end).
        skip: :class:`AdaptiveSkip` settings, a fixed :class:`SkipPath`, or None to evaluate every step.
        solver_type: ``dpmsolver`` (midpoint) or ``taylor`` (heun) for DPM-Solver's corrections,
            ``bh1`` or ``bh2`` for UniPC's B(h); None picks the solver's default.
        thresholding: dynamic thresholding of x0 at ``threshold_ratio``, floor ``threshold_max``
            (noise-form solvers get the thresholded x0 converted back to eps).
        model_kwargs: per-sample tensors (e.g. class labels ``y``) passed to the model;
            they are sliced together with x when only some samples are evaluated.
        generator: random source for the DDPM ancestral noise.
        atol, rtol, h_init: tolerances and first step (in lambda) of the adaptive method.
        progress: show a progress bar.
        callback: ``callback(info)`` once per step, as k-diffusion's samplers do: a
            :class:`~pdm.sampling.methods.StepInfo` with the step index ``i``, its start time
            ``t``, the state ``x`` there, the x0 prediction ``info.x0`` and the ``evaluated`` rows
            (e.g. to save intermediate predictions; the progress bar is one such callback).
        corrections: learned per-step scalings of the multistep correction
            (:mod:`pdm.sampling.coefficients`; a calibrated path carries them), or None.
        teleport: a :class:`~pdm.sampling.teleport.Teleport`: ``noise`` is then x at the
            schedule's t_max, carried without the network to the grid's first time (a
            calibrated path that teleports starts below t_max), where the solver starts.
    """
    solver_type = check_settings(solver, method, order, steps, skip_type, prediction, solver_type)
    _check_method_options(method, skip, corrections)
    spec = solver_spec(solver)
    order = 1 if spec.first_order else order
    batch, device = noise.shape[0], noise.device
    grid = _grid(schedule, steps, skip_type, t_start, t_end, timesteps, noise.dtype, device)
    noise = noise if teleport is None else _teleported(teleport, noise, schedule, grid, method, model_kwargs)
    fine_steps, kept = grid.numel() - 1, None
    if isinstance(skip, SkipPath) and skip.fill == "merge":  # the solver runs on the kept points only
        grid, kept = _merged_grid(grid, skip, method)
        skip = None
    evaluate = ModelEvaluator(model_fn, prediction, spec.data, _check_model_kwargs(model_kwargs, batch),
                              Thresholding(threshold_ratio, threshold_max) if thresholding else None, batch, device)
    controller = Skipper(skip, batch, device, evaluate.convert)
    with _reporting(None if method == "adaptive" else grid.numel() - 1, progress, callback) as on_step:
        if method == "adaptive":
            x, rows, grid = adaptive_step_size(noise, grid[0], grid[-1], order, schedule, evaluate, solver_type, atol,
                                               rtol, h_init, on_step)
        elif method == "multistep":
            points = [TimePoint.at(schedule, t) for t in grid]
            stepper = multistep_solver(solver, order, solver_type, lower_order_final, generator, denoise_to_zero,
                                       schedule, corrections)
            x, rows = multistep(noise, points, stepper, evaluate, controller, on_step)
        else:
            x, rows, grid = _singlestep(noise, schedule, grid, steps, order, method, skip_type, timesteps is None,
                                        evaluate, controller, solver_type, on_step)
    if denoise_to_zero:
        x = evaluate.data_prediction(x, TimePoint.at(schedule, grid[-1]))
    return SampleResult(x=x, nfe=float(evaluate.nfe.double().mean()), evaluated=_rows(rows, kept, fine_steps, noise),
                        nfe_per_sample=evaluate.nfe.clone(), timesteps=grid)


def _teleported(teleport: Callable[..., Tensor], noise: Tensor, schedule: VPSchedule, grid: Tensor, method: str,
                model_kwargs: dict[str, Tensor] | None) -> Tensor:
    """``noise`` (at t_max) carried by the teleport to the grid's first time."""
    if method == "adaptive":
        raise ValueError("a teleport starts a fixed grid; it cannot be combined with the adaptive method")
    return teleport(noise, schedule, float(grid[0]), (model_kwargs or {}).get("y"))


@contextmanager
def _reporting(total: int | None, progress: bool, callback: Callable[[StepInfo], None] | None):
    """The per-step hook of a run: the progress bar's tick, then the caller's ``callback``."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="sampling", leave=False, disable=not progress) as bar:
        def on_step(info: StepInfo) -> None:
            bar.update()
            if callback is not None:
                callback(info)

        yield on_step


def _rows(rows: list[Tensor], kept: list[int] | None, fine_steps: int, noise: Tensor) -> Tensor:
    """The (steps, batch) evaluated mask; a merged path gets one row per step of its fine grid."""
    blank = torch.zeros(noise.shape[0], dtype=torch.bool, device=noise.device)
    if kept is not None:  # merged steps called no network
        fine = [blank] * fine_steps
        for k, i in enumerate(kept[:-1]):
            fine[i] = rows[k]
        rows = fine
    return torch.stack(rows) if rows else blank[None][:0]


def _merged_grid(grid: Tensor, path: SkipPath, method: str) -> tuple[Tensor, list[int]]:
    """The kept points of ``grid`` (and its end) for a merge-fill path, and their indices."""
    steps = grid.numel() - 1
    if len(path.evaluate) != steps:
        raise ValueError(f"the skip path has {len(path.evaluate)} steps but the grid {steps}; sample with steps="
                         f"{len(path.evaluate)} (its settings: {path.settings or 'none recorded'})")
    if method != "multistep":
        raise ValueError("a merge-fill skip path replays with the multistep method")
    kept = [i for i, e in enumerate(path.evaluate) if e] + [steps]
    return grid[kept], kept


def _check_model_kwargs(model_kwargs: dict[str, Tensor] | None, batch: int) -> dict[str, Tensor]:
    kwargs = dict(model_kwargs or {})
    for k, v in kwargs.items():
        if v.shape[0] != batch:
            raise ValueError(f"model_kwargs[{k!r}] has {v.shape[0]} rows for a batch of {batch}")
    return kwargs


def _grid(schedule: VPSchedule, steps: int, skip_type: str, t_start: float | None, t_end: float | None,
          timesteps: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    if timesteps is None:
        return schedule.timesteps(steps, skip_type, t_start, t_end, dtype=dtype, device=device)
    grid = torch.as_tensor(timesteps, dtype=dtype, device=device).flatten()
    if grid.numel() < 2 or not bool((grid.diff() < 0).all()):
        raise ValueError("timesteps must be a decreasing sequence of at least 2 times")
    if not bool(torch.isfinite(grid).all()) or float(grid[-1]) <= 0:
        raise ValueError("timesteps must be finite and positive")
    return grid


def _singlestep(x: Tensor, schedule: VPSchedule, grid: Tensor, steps: int, order: int, method: str, skip_type: str,
                own_grid: bool, evaluate: ModelEvaluator, controller: Skipper, solver_type: str,
                progress: Callable[[StepInfo], None]) -> tuple[Tensor, list[Tensor], Tensor]:
    """The official singlestep grids: outer steps and, inside each, points spaced like ``skip_type``.

    DPM-Solver-fast (``singlestep``) splits ``steps`` evaluations into orders summing to
    ``steps``; its outer grid is the fine ``steps``-grid taken at the cumulative orders (for
    ``logSNR`` it is a grid of its own, as in the paper). ``singlestep_fixed`` takes
    ``steps // order`` steps of one order. The intermediate points of a step [s, t] are the
    inner grid of ``order`` sub-intervals built with ``skip_type`` (r = 1/2, 1/3, 2/3 holds
    only for logSNR), as the official code does.
    """
    if method == "singlestep":
        orders = singlestep_orders(steps, order)
        if own_grid and skip_type == "logSNR":
            grid = schedule.timesteps(len(orders), skip_type, float(grid[0]), float(grid[-1]), grid.dtype, grid.device)
        elif own_grid:
            cum = torch.cumsum(torch.tensor([0] + orders), 0).to(grid.device)
            grid = grid[cum]
    else:
        orders = [order] * (steps // order)
        if own_grid:
            grid = schedule.timesteps(len(orders), skip_type, float(grid[0]), float(grid[-1]), grid.dtype, grid.device)
    if grid.numel() != len(orders) + 1:
        raise ValueError(f"a singlestep run of {len(orders)} steps needs {len(orders) + 1} timesteps, got {grid.numel()}")
    outer = [TimePoint.at(schedule, t) for t in grid]
    inner = []
    for k, step_order in enumerate(orders):
        sub = schedule.timesteps(step_order, skip_type, float(grid[k]), float(grid[k + 1]), grid.dtype, grid.device)
        inner.append([TimePoint.at(schedule, t) for t in sub[1:-1]])
    x, rows = singlestep(x, outer, inner, orders, evaluate, controller, solver_type, progress)
    return x, rows, grid


