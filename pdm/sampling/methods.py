"""The three ways to drive a solver along a time grid, one function each.

- :func:`multistep`: one evaluation per step, earlier outputs reused (DPM-Solver++ 2211.01095
  Alg. 2, UniPC 2302.04867 Alg. 3 with its corrector, iPNDM, DDIM, DDPM).
- :func:`singlestep`: 1-3 evaluations inside each step (DPM-Solver 2206.00927 Alg. 1-2,
  "DPM-Solver-fast" when the orders are mixed).
- :func:`adaptive_step_size`: DPM-Solver-12/23 with step-size control (2206.00927 Sec. 4.2).

Each returns the final x and one row per step telling which samples called the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pdm.sampling.catalog import MultistepSolver
from pdm.sampling.evaluator import ModelEvaluator
from pdm.sampling.settings import Settings
from pdm.sampling.skipper import Skipper
from pdm.sampling.solvers import (
    ExpStep,
    TimePoint,
    first_order_update,
    singlestep_second_update,
    singlestep_third_update,
)
from pdm.schedule import VPSchedule


@dataclass(frozen=True)
class StepInfo:
    """What a ``sample(..., callback=fn)`` callback gets once per step, before the step's update
    is applied (k-diffusion's convention): step ``i`` (0-based) starts at time ``t`` from state
    ``x``, where the model's (possibly filled or thresholded) output is ``output`` in the solver's
    form; ``evaluated`` tells which samples called the network for this step. (A correcting
    solver, UniPC, evaluated ``output`` at its predictor's state; ``x`` is the corrected one.)"""

    i: int
    t: Tensor
    x: Tensor
    output: Tensor
    point: TimePoint
    data: bool
    evaluated: Tensor

    @property
    def x0(self) -> Tensor:
        """The data prediction at (x, t): the output itself in the data form, (x - sigma eps) / alpha
        in the noise form."""
        if self.data:
            return self.output
        return (self.x - self.point.sigma * self.output) / self.point.alpha


Progress = Callable[[StepInfo], None]


def multistep(
    x: Tensor,
    points: Sequence[TimePoint],
    solver: MultistepSolver,
    evaluate: ModelEvaluator,
    skip: Skipper,
    progress: Progress,
) -> tuple[Tensor, list[Tensor]]:
    """Step i goes from points[i-1] to points[i] with the outputs at points[i-1], points[i-2], ...

    The output at the new point is evaluated (or filled, if skipped) right after the step,
    and a correcting solver (UniPC) then redoes the step with it at no extra cost.
    """
    steps = len(points) - 1
    history = solver.order  # past points each update needs
    first, evaluated = skip.evaluate(evaluate.raw, x, points[0])
    outputs = [first]
    rows: list[Tensor] = []
    for i in range(1, steps + 1):
        order = solver.order_at(i, steps)
        past = points[max(0, i - history) : i]
        x_new = solver.predict(x, past, outputs, points[i], order, last=i == steps)
        rows.append(evaluated)
        progress(
            StepInfo(i - 1, points[i - 1].t, x, outputs[-1], points[i - 1], solver.data, evaluated)
        )
        if i == steps:
            return x_new, rows
        after = ExpStep(points[i], points[i + 1], solver.data)
        skip.observe(x_new, evaluated, points[i].lambda_, after.scale * after.phi_1)
        m_new, evaluated = skip.evaluate(evaluate.raw, x_new, points[i])
        if solver.corrects:
            x_new = solver.correct(x, past, outputs, points[i], m_new, order)
        x = x_new
        outputs = (outputs + [m_new])[-history:]
    return x, rows


def singlestep(
    x: Tensor,
    outer: Sequence[TimePoint],
    inner: Sequence[Sequence[TimePoint]],
    orders: Sequence[int],
    evaluate: ModelEvaluator,
    skip: Skipper,
    solver_type: str,
    progress: Progress,
) -> tuple[Tensor, list[Tensor]]:
    """Step k goes from outer[k] to outer[k+1] with orders[k] evaluations at inner[k] (its
    intermediate points). A skipped step fills every evaluation inside it."""
    data = evaluate.data
    rows: list[Tensor] = []
    for k, order in enumerate(orders):
        s, t = outer[k], outer[k + 1]
        model_at = _StepEvaluations(skip, evaluate)
        m_s = model_at(x, s)
        x_s = x
        if order == 1:
            x = first_order_update(x, s, t, m_s, data)
        elif order == 2:
            x, _ = singlestep_second_update(x, s, inner[k][0], t, m_s, model_at, data, solver_type)
        else:
            x, _ = singlestep_third_update(
                x, s, inner[k][0], inner[k][1], t, m_s, model_at, data, solver_type
            )
        rows.append(model_at.evaluated)
        progress(StepInfo(k, s.t, x_s, m_s, s, data, rows[-1]))
        if k + 1 < len(orders):
            after = ExpStep(t, outer[k + 2], data)
            skip.observe(x, rows[-1], t.lambda_, after.scale * after.phi_1)
    return x, rows


class _StepEvaluations:
    """``model_at(x, point)`` for the evaluations inside one singlestep step (one skip decision
    for all of them); ``evaluated`` gathers which samples ran the network."""

    def __init__(self, skip: Skipper, evaluate: ModelEvaluator) -> None:
        self.skip, self.evaluate, self.evaluated = skip, evaluate, None

    def __call__(self, x: Tensor, point: TimePoint) -> Tensor:
        out, evaluated = self.skip.evaluate(self.evaluate.raw, x, point)
        self.evaluated = evaluated if self.evaluated is None else self.evaluated | evaluated
        return out


def adaptive_step_size(
    x: Tensor,
    t_start: Tensor,
    t_end: Tensor,
    schedule: VPSchedule,
    evaluate: ModelEvaluator,
    settings: Settings,
    progress: Progress = lambda info: None,
) -> tuple[Tensor, list[Tensor], Tensor]:
    """DPM-Solver-12 (order 2) or -23 (order 3) with step-size control in lambda.

    A lower- and a higher-order try share their evaluations; the scaled difference
    E = RMS((x_high - x_low) / max(atol, rtol max(|x_low|, |x_prev|))) accepts the step when
    E <= 1, and the next step is theta h E^(-1/order) (theta = 0.9). Rejected tries count as
    evaluations. Returns x, one all-True row per accepted step, and the accepted times.
    """
    theta, t_err = 0.9, 1e-5
    order, solver_type = settings.order, settings.variant or "dpmsolver"
    atol, rtol, h_init = settings.atol, settings.rtol, settings.h_init
    data = evaluate.data
    s = TimePoint.at(schedule, t_start)
    lam_end = schedule.lambda_(t_end)
    h = torch.full_like(s.lambda_, h_init)
    x_prev, used = x, [t_start.clone()]

    def point(lam: Tensor) -> TimePoint:
        return TimePoint.at(schedule, schedule.t_of_lambda(lam))

    while float((s.t - t_end).abs()) > t_err:
        t = point(s.lambda_ + h)
        m_s = evaluate(x, s)
        if order == 2:  # DPM-Solver-1 against DPM-Solver-2 at r1 = 1/2
            x_low = first_order_update(x, s, t, m_s, data)
            x_high, _ = singlestep_second_update(
                x, s, point(s.lambda_ + 0.5 * h), t, m_s, evaluate, data, solver_type
            )
        else:  # DPM-Solver-2 at r1 = 1/3 against DPM-Solver-3 at (1/3, 2/3), sharing m_s1
            s1, s2 = point(s.lambda_ + h / 3.0), point(s.lambda_ + 2.0 * h / 3.0)
            x_low, (_, m_s1) = singlestep_second_update(
                x, s, s1, t, m_s, evaluate, data, solver_type
            )
            x_high, _ = singlestep_third_update(
                x, s, s1, s2, t, m_s, evaluate, data, solver_type, m_s1=m_s1
            )
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        err = ((x_high - x_low) / delta).flatten(1).pow(2).mean(dim=1).sqrt().max()
        if bool(err <= 1.0):
            everyone = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            progress(StepInfo(len(used) - 1, s.t, x, m_s, s, data, everyone))
            x, s, x_prev = x_high, t, x_low
            used.append(t.t.clone())
        h = torch.minimum(theta * h * err.clamp(min=1e-12) ** (-1.0 / order), lam_end - s.lambda_)
    rows = [torch.ones(x.shape[0], dtype=torch.bool, device=x.device)] * (len(used) - 1)
    return x, rows, torch.stack(used)
