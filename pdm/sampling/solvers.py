"""DPM-Solver and DPM-Solver++ update rules (Lu et al. 2022, arXiv 2206.00927 and 2211.01095).

Each function advances x from time s to time t (t < s) given model outputs already
converted to the solver's parameterisation: data predictions x0 for DPM-Solver++
(``data=True``) and noise predictions eps for DPM-Solver (``data=False``). Notation:
lambda = log alpha - log sigma, h = lambda_t - lambda_s > 0. The multistep formulas are the
multistep DPM-Solver(++) of 2211.01095 Sec. 4 / App. B; the singlestep ones are Algorithms
1-2 of 2206.00927 and their data-prediction counterparts. ``solver_type`` chooses how the
first-order difference enters the second-order step: ``"dpmsolver"`` (diffusers' midpoint)
or ``"taylor"`` (diffusers' heun).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pdm.schedule import VPSchedule

SOLVER_TYPES = ("dpmsolver", "taylor")
_ALIASES = {"midpoint": "dpmsolver", "heun": "taylor", "dpmsolver": "dpmsolver", "taylor": "taylor"}


def canonical_solver_type(name: str) -> str:
    """Map diffusers' names (midpoint, heun) onto the official ones (dpmsolver, taylor)."""
    if name not in _ALIASES:
        raise ValueError(f"unknown solver_type {name!r}; choose dpmsolver (midpoint) or taylor (heun)")
    return _ALIASES[name]


class Coefficients:
    """alpha, sigma, log alpha and lambda of one scalar time, in a given dtype."""

    def __init__(self, schedule: VPSchedule, t: Tensor) -> None:
        self.t = t
        self.log_alpha = schedule.log_alpha(t)
        self.alpha = torch.exp(self.log_alpha)
        self.sigma = schedule.sigma(t)
        self.lambda_ = schedule.lambda_(t)


def first_order_update(x: Tensor, s: Coefficients, t: Coefficients, m_s: Tensor, data: bool) -> Tensor:
    """DDIM / DPM-Solver-1: the exact solution of the linear part with a constant model output."""
    h = t.lambda_ - s.lambda_
    if data:
        return (t.sigma / s.sigma) * x - t.alpha * torch.expm1(-h) * m_s
    return torch.exp(t.log_alpha - s.log_alpha) * x - t.sigma * torch.expm1(h) * m_s


def multistep_second_update(
    x: Tensor, prev: Sequence[Coefficients], t: Coefficients, m: Sequence[Tensor], data: bool, solver_type: str
) -> Tensor:
    """Multistep DPM-Solver(++)-2M from the last two outputs m[-1] (at prev[-1]) and m[-2]."""
    s0, s1 = prev[-1], prev[-2]
    m0, m1 = m[-1], m[-2]
    h = t.lambda_ - s0.lambda_
    r0 = (s0.lambda_ - s1.lambda_) / h
    d1 = (m0 - m1) / r0
    if data:
        phi_1 = torch.expm1(-h)
        x_t = (t.sigma / s0.sigma) * x - t.alpha * phi_1 * m0
        if solver_type == "dpmsolver":
            return x_t - 0.5 * t.alpha * phi_1 * d1
        return x_t + t.alpha * (phi_1 / h + 1.0) * d1
    phi_1 = torch.expm1(h)
    x_t = torch.exp(t.log_alpha - s0.log_alpha) * x - t.sigma * phi_1 * m0
    if solver_type == "dpmsolver":
        return x_t - 0.5 * t.sigma * phi_1 * d1
    return x_t - t.sigma * (phi_1 / h - 1.0) * d1


def multistep_third_update(
    x: Tensor, prev: Sequence[Coefficients], t: Coefficients, m: Sequence[Tensor], data: bool
) -> Tensor:
    """Multistep DPM-Solver(++)-3M from the last three outputs."""
    s0, s1, s2 = prev[-1], prev[-2], prev[-3]
    m0, m1, m2 = m[-1], m[-2], m[-3]
    h = t.lambda_ - s0.lambda_
    r0 = (s0.lambda_ - s1.lambda_) / h
    r1 = (s1.lambda_ - s2.lambda_) / h
    d1_0 = (m0 - m1) / r0
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    if data:
        phi_1 = torch.expm1(-h)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        return (t.sigma / s0.sigma) * x - t.alpha * phi_1 * m0 + t.alpha * phi_2 * d1 - t.alpha * phi_3 * d2
    phi_1 = torch.expm1(h)
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    return torch.exp(t.log_alpha - s0.log_alpha) * x - t.sigma * phi_1 * m0 - t.sigma * phi_2 * d1 - t.sigma * phi_3 * d2


ModelAt = Callable[[Tensor, Coefficients], Tensor]


def singlestep_update(
    x: Tensor,
    s: Coefficients,
    t: Coefficients,
    order: int,
    model_at: ModelAt,
    schedule: VPSchedule,
    data: bool,
    solver_type: str,
    reuse: Sequence[Tensor] = (),
    return_intermediate: bool = False,
    r1: float | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """One singlestep DPM-Solver(++) step of order 1, 2 (r1 = 1/2) or 3 (r1 = 1/3, r2 = 2/3).

    ``model_at(x, coeffs)`` evaluates the model in the solver's parameterisation. ``reuse``
    holds outputs already known at s (and at the first intermediate point), which the
    adaptive solver passes from its lower-order try; ``r1`` moves the intermediate point of
    a second-order step. With ``return_intermediate`` the outputs are returned too.
    """
    m_s = reuse[0] if len(reuse) > 0 else model_at(x, s)
    outputs = [m_s]
    h = t.lambda_ - s.lambda_

    def point(r: float) -> Coefficients:
        return Coefficients(schedule, schedule.t_of_lambda(s.lambda_ + r * h))

    def lin(c: Coefficients, phi: Tensor) -> Tensor:
        # the first-order part of the update from s to the point c, with phi = expm1(-+r h)
        if data:
            return (c.sigma / s.sigma) * x - c.alpha * phi * m_s
        return torch.exp(c.log_alpha - s.log_alpha) * x - c.sigma * phi * m_s

    sign = -1.0 if data else 1.0
    if order == 1:
        x_t = first_order_update(x, s, t, m_s, data)
    elif order == 2:
        r1 = 0.5 if r1 is None else r1
        s1 = point(r1)
        x_s1 = lin(s1, torch.expm1(sign * r1 * h))
        m_s1 = model_at(x_s1, s1)
        outputs.append(m_s1)
        phi_1 = torch.expm1(sign * h)
        scale = t.alpha if data else t.sigma
        if solver_type == "dpmsolver":
            x_t = lin(t, phi_1) - (0.5 / r1) * scale * phi_1 * (m_s1 - m_s)
        elif data:
            x_t = lin(t, phi_1) + (1.0 / r1) * t.alpha * (phi_1 / h + 1.0) * (m_s1 - m_s)
        else:
            x_t = lin(t, phi_1) - (1.0 / r1) * t.sigma * (phi_1 / h - 1.0) * (m_s1 - m_s)
    elif order == 3:
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        s1, s2 = point(r1), point(r2)
        if len(reuse) > 1:
            m_s1 = reuse[1]
        else:
            m_s1 = model_at(lin(s1, torch.expm1(sign * r1 * h)), s1)
        phi_12 = torch.expm1(sign * r2 * h)
        phi_1 = torch.expm1(sign * h)
        if data:
            phi_22 = phi_12 / (r2 * h) + 1.0
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x_s2 = lin(s2, phi_12) + (r2 / r1) * s2.alpha * phi_22 * (m_s1 - m_s)
        else:
            phi_22 = phi_12 / (r2 * h) - 1.0
            phi_2 = phi_1 / h - 1.0
            phi_3 = phi_2 / h - 0.5
            x_s2 = lin(s2, phi_12) - (r2 / r1) * s2.sigma * phi_22 * (m_s1 - m_s)
        m_s2 = model_at(x_s2, s2)
        outputs += [m_s1, m_s2]
        d1_0 = (m_s1 - m_s) / r1
        d1_1 = (m_s2 - m_s) / r2
        sgn = 1.0 if data else -1.0
        scale = t.alpha if data else t.sigma
        if solver_type == "dpmsolver":
            x_t = lin(t, phi_1) + sgn * (1.0 / r2) * scale * phi_2 * (m_s2 - m_s)
        else:
            d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
            x_t = lin(t, phi_1) + sgn * scale * phi_2 * d1 - scale * phi_3 * d2
    else:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    return (x_t, outputs) if return_intermediate else x_t


def singlestep_orders(steps: int, order: int) -> list[int]:
    """The order of each step of DPM-Solver-fast for a budget of ``steps`` evaluations.

    As in the official code: mostly ``order``-th order steps with the remainder spent on
    one lower-order step at the end, so the orders sum to ``steps``.
    """
    if order == 3:
        k = steps // 3 + 1
        if steps % 3 == 0:
            return [3] * (k - 2) + [2, 1]
        if steps % 3 == 1:
            return [3] * (k - 1) + [1]
        return [3] * (k - 1) + [2]
    if order == 2:
        return [2] * (steps // 2) + ([1] if steps % 2 else [])
    return [1] * steps
