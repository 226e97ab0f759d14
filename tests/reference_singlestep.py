"""An independent float64 NumPy implementation of the official singlestep DPM-Solver(++).

Written from the papers (2206.00927 Alg. 1-2 and App. B; 2211.01095 App. B) and the official
code's grid rules, sharing no code with pdm: its own schedule (np.interp of log alpha over the
knots t_n = (n + 1) / N), its own time grids, its own update formulas. Slow and plain on purpose.
"""

from __future__ import annotations

import numpy as np


class Schedule:
    """A discrete VP schedule in continuous time, the official DPM-Solver way."""

    def __init__(self, betas: np.ndarray) -> None:
        n = len(betas)
        self.n = n
        self.t_knots = np.arange(1, n + 1) / n
        self.log_alpha_knots = 0.5 * np.cumsum(np.log(1.0 - betas))

    def log_alpha(self, t: float) -> float:
        return float(np.interp(t, self.t_knots, self.log_alpha_knots))

    def alpha(self, t: float) -> float:
        return float(np.exp(self.log_alpha(t)))

    def sigma(self, t: float) -> float:
        return float(np.sqrt(1.0 - np.exp(2.0 * self.log_alpha(t))))

    def lam(self, t: float) -> float:
        return self.log_alpha(t) - float(np.log(self.sigma(t)))

    def t_of_lam(self, lam: float) -> float:
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)
        return float(np.interp(log_alpha, self.log_alpha_knots[::-1], self.t_knots[::-1]))

    def grid(self, skip_type: str, t_T: float, t_0: float, n: int) -> np.ndarray:
        if skip_type == "time_uniform":
            return np.linspace(t_T, t_0, n + 1)
        if skip_type == "time_quadratic":
            return np.linspace(np.sqrt(t_T), np.sqrt(t_0), n + 1) ** 2
        lams = np.linspace(self.lam(t_T), self.lam(t_0), n + 1)
        return np.array([self.t_of_lam(x) for x in lams])


def fast_orders(steps: int, order: int) -> list[int]:
    """DPM-Solver-fast's split of ``steps`` evaluations (2206.00927 App. D.1)."""
    if order == 3:
        k = steps // 3 + 1
        return {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[
            steps % 3
        ]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def singlestep_sample(
    eps_fn,
    x: np.ndarray,
    sched: Schedule,
    steps: int,
    order: int,
    skip_type: str,
    data: bool,
    solver_type: str,
) -> np.ndarray:
    """DPM-Solver-fast from t = 1 to t = 1/N; ``eps_fn(x, t)`` is a noise predictor."""
    t_T, t_0 = 1.0, 1.0 / sched.n
    orders = fast_orders(steps, order)
    if skip_type == "logSNR":
        outer = sched.grid(skip_type, t_T, t_0, len(orders))
    else:
        outer = sched.grid(skip_type, t_T, t_0, steps)[np.cumsum([0] + orders)]

    def model(x_, t):
        e = eps_fn(x_, t)
        return (x_ - sched.sigma(t) * e) / sched.alpha(t) if data else e

    def linear(x_, s, t, m):  # the first-order (DDIM) part from s to t
        h = sched.lam(t) - sched.lam(s)
        if data:
            return sched.sigma(t) / sched.sigma(s) * x_ - sched.alpha(t) * np.expm1(-h) * m
        return (
            np.exp(sched.log_alpha(t) - sched.log_alpha(s)) * x_ - sched.sigma(t) * np.expm1(h) * m
        )

    def phi2(
        s, t
    ):  # the h-scaled phi_2 coefficient times alpha_t (data) or sigma_t (noise), with its sign
        h = sched.lam(t) - sched.lam(s)
        if data:
            return sched.alpha(t) * (np.expm1(-h) / h + 1.0)
        return -sched.sigma(t) * (np.expm1(h) / h - 1.0)

    for k, p in enumerate(orders):
        s, t = outer[k], outer[k + 1]
        inner = sched.grid(skip_type, s, t, p)
        h = sched.lam(t) - sched.lam(s)
        m_s = model(x, s)
        if p == 1:
            x = linear(x, s, t, m_s)
            continue
        s1 = inner[1]
        r1 = (sched.lam(s1) - sched.lam(s)) / h
        m_s1 = model(linear(x, s, s1, m_s), s1)
        if p == 2:
            if solver_type == "dpmsolver":
                scale = sched.alpha(t) * np.expm1(-h) if data else sched.sigma(t) * np.expm1(h)
                x = linear(x, s, t, m_s) - 0.5 / r1 * scale * (m_s1 - m_s)
            else:
                x = linear(x, s, t, m_s) + phi2(s, t) / r1 * (m_s1 - m_s)
            continue
        s2 = inner[2]
        r2 = (sched.lam(s2) - sched.lam(s)) / h
        x_s2 = linear(x, s, s2, m_s) + r2 / r1 * phi2(s, s2) * (m_s1 - m_s)
        m_s2 = model(x_s2, s2)
        if solver_type == "dpmsolver":
            x = linear(x, s, t, m_s) + phi2(s, t) / r2 * (m_s2 - m_s)
        else:
            d1_0, d1_1 = (m_s1 - m_s) / r1, (m_s2 - m_s) / r2
            d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
            phi3 = (sched.alpha(t) if data else sched.sigma(t)) * (
                ((np.expm1(-h) / h + 1.0) / h - 0.5)
                if data
                else ((np.expm1(h) / h - 1.0) / h - 0.5)
            )
            x = linear(x, s, t, m_s) + phi2(s, t) * d1 - phi3 * d2
    return x
