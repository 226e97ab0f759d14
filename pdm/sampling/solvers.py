"""Update rules of the training-free solvers: one step of x from time s to time t < s.

The maths of every solver lives here; the loops that drive them are in
:mod:`pdm.sampling.methods`. Notation (Lu et al. 2022, arXiv 2206.00927 and 2211.01095):
x_t = alpha_t x0 + sigma_t eps, lambda = log(alpha / sigma), h = lambda_t - lambda_s > 0.

Model outputs reach an update already converted to the solver's form: data predictions x0
for the *data form* (DPM-Solver++, DDIM, UniPC, DDPM) and noise predictions eps for the
*noise form* (DPM-Solver, iPNDM). Both forms integrate the linear part of the ODE exactly
(an exponential integrator); :class:`ExpStep` holds the coefficients of one step so the
formulas below read the same in either form:

    data form:  x_t = (sigma_t/sigma_s) x_s - alpha_t (e^-h - 1) x0_s + ...
    noise form: x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h  - 1) eps_s + ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pdm.sampling.points import ExpStep, TimePoint

# --- DPM-Solver(++) -------------------------------------------------------------------------------


def first_order_update(x: Tensor, s: TimePoint, t: TimePoint, m_s: Tensor, data: bool) -> Tensor:
    """DDIM / DPM-Solver-1 from s to t with the output m_s at s."""
    return ExpStep(s, t, data).first_order(x, m_s)


def multistep_second_update(
    x: Tensor,
    points: Sequence[TimePoint],
    t: TimePoint,
    outputs: Sequence[Tensor],
    data: bool,
    solver_type: str,
) -> Tensor:
    """Multistep DPM-Solver(++)-2M from the last two outputs (at points[-1] and points[-2])."""
    s0, s1 = points[-1], points[-2]
    m0, m1 = outputs[-1], outputs[-2]
    step = ExpStep(s0, t, data)
    r0 = (s0.lambda_ - s1.lambda_) / step.h
    d1 = (m0 - m1) / r0
    if solver_type == "dpmsolver":
        return step.first_order(x, m0) - 0.5 * step.scale * step.phi_1 * d1
    return step.first_order(x, m0) + step.sign * step.scale * step.phi_2 * d1


def multistep_third_update(
    x: Tensor, points: Sequence[TimePoint], t: TimePoint, outputs: Sequence[Tensor], data: bool
) -> Tensor:
    """Multistep DPM-Solver(++)-3M from the last three outputs."""
    s0, s1, s2 = points[-1], points[-2], points[-3]
    m0, m1, m2 = outputs[-1], outputs[-2], outputs[-3]
    step = ExpStep(s0, t, data)
    r0 = (s0.lambda_ - s1.lambda_) / step.h
    r1 = (s1.lambda_ - s2.lambda_) / step.h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return (
        step.first_order(x, m0)
        + step.sign * step.scale * step.phi_2 * d1
        - step.scale * step.phi_3 * d2
    )


ModelAt = Callable[[Tensor, TimePoint], Tensor]


def singlestep_second_update(
    x: Tensor,
    s: TimePoint,
    s1: TimePoint,
    t: TimePoint,
    m_s: Tensor,
    model_at: ModelAt,
    data: bool,
    solver_type: str,
) -> tuple[Tensor, list[Tensor]]:
    """Singlestep DPM-Solver(++)-2 (2206.00927 Alg. 1): one extra evaluation at s1 in (s, t).

    Returns x_t and the outputs [m_s, m_s1].
    """
    step = ExpStep(s, t, data)
    r1 = (s1.lambda_ - s.lambda_) / step.h
    m_s1 = model_at(ExpStep(s, s1, data).first_order(x, m_s), s1)
    if solver_type == "dpmsolver":
        x_t = step.first_order(x, m_s) - (0.5 / r1) * step.scale * step.phi_1 * (m_s1 - m_s)
    else:
        x_t = step.first_order(x, m_s) + step.sign * (1.0 / r1) * step.scale * step.phi_2 * (
            m_s1 - m_s
        )
    return x_t, [m_s, m_s1]


def singlestep_third_update(
    x: Tensor,
    s: TimePoint,
    s1: TimePoint,
    s2: TimePoint,
    t: TimePoint,
    m_s: Tensor,
    model_at: ModelAt,
    data: bool,
    solver_type: str,
    m_s1: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Singlestep DPM-Solver(++)-3 (2206.00927 Alg. 2): evaluations at s1 and s2 in (s, t).

    ``m_s1`` may be given when it is already known (the adaptive solver's lower-order try).
    Returns x_t and the outputs [m_s, m_s1, m_s2].
    """
    step = ExpStep(s, t, data)
    r1 = (s1.lambda_ - s.lambda_) / step.h
    r2 = (s2.lambda_ - s.lambda_) / step.h
    if m_s1 is None:
        m_s1 = model_at(ExpStep(s, s1, data).first_order(x, m_s), s1)
    to_s2 = ExpStep(s, s2, data)
    x_s2 = to_s2.first_order(x, m_s) + to_s2.sign * (r2 / r1) * to_s2.scale * to_s2.phi_2 * (
        m_s1 - m_s
    )
    m_s2 = model_at(x_s2, s2)
    if solver_type == "dpmsolver":
        x_t = step.first_order(x, m_s) + step.sign * (1.0 / r2) * step.scale * step.phi_2 * (
            m_s2 - m_s
        )
    else:
        d1_0, d1_1 = (m_s1 - m_s) / r1, (m_s2 - m_s) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        x_t = (
            step.first_order(x, m_s)
            + step.sign * step.scale * step.phi_2 * d1
            - step.scale * step.phi_3 * d2
        )
    return x_t, [m_s, m_s1, m_s2]


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


# --- UniPC (Zhao et al. 2023, arXiv 2302.04867), data form ---------------------------------------


def _unipc_system(rks: Tensor, step: ExpStep, variant: str) -> tuple[Tensor, Tensor, Tensor]:
    """R (powers of the ratios r_k), b and B(h) of UniPC's order conditions (Alg. 1-3 of the paper).

    With hh the signed step, b_i = i! * h phi_{i+1}(hh) / B(h), where the phi's follow the
    recursion h phi_{k+1} = h phi_k / hh - 1/k!. B(h) = hh (bh1) or e^hh - 1 (bh2).
    """
    hh = step.hh
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    h_phi_k = torch.expm1(hh) / hh - 1.0
    rows, b, factorial = [], [], 1
    for i in range(1, rks.numel() + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return torch.stack(rows), torch.stack(b), b_h


def _unipc_ratios(points: Sequence[TimePoint], order: int, h: Tensor) -> list[Tensor]:
    """Ratios r_k = (lambda_{s_k} - lambda_{s_0}) / h, k = 1 .. order-1, of the history."""
    s0 = points[-1]
    return [(points[-1 - k].lambda_ - s0.lambda_) / h for k in range(1, order)]


def _solve(a: Tensor, b: Tensor) -> Tensor:
    """a^-1 b without reading an error flag back to the host (``torch.linalg.solve`` does, a GPU
    synchronisation per step); UniPC's systems are Vandermonde in distinct ratios, never singular."""
    return torch.linalg.solve_ex(a, b, check_errors=False)[0]


def _combine(x: Tensor, ratio: Tensor, terms: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """ratio x + sum_j c_j m_j with scalar (0-d) c_j: one pass over the batch per term."""
    out = ratio * x
    for c, m in terms:
        out = out.addcmul_(c, m)
    return out


def _unipc_step(
    x: Tensor,
    outputs: Sequence[Tensor],
    rhos: Tensor,
    rks: Sequence[Tensor],
    step: ExpStep,
    b_h: Tensor,
    m_t: Tensor | None = None,
) -> Tensor:
    """x_t = DDIM(x, m_0) - alpha_t B(h) (sum_k rho_k D_k [+ rho_t (m_t - m_0)]), D_k = (m_k - m_0) / r_k,
    evaluated as one linear combination of x and the outputs (the difference form costs two
    passes over the batch per term; this one, one)."""
    w = -step.scale * b_h
    coefs = [w * rho / rk for rho, rk in zip(rhos, rks)]  # of m_1 .. m_{p-1}
    terms = [(c, outputs[-1 - k]) for k, c in enumerate(coefs, 1)]
    if m_t is not None:
        coefs.append(w * rhos[-1])
        terms.append((coefs[-1], m_t))
    c0 = -step.scale * step.phi_1 - sum(coefs)
    return _combine(x, step.ratio, [(c0, outputs[-1]), *terms])


def unipc_predict(
    x: Tensor,
    points: Sequence[TimePoint],
    t: TimePoint,
    outputs: Sequence[Tensor],
    order: int,
    variant: str,
) -> Tensor:
    """The predictor UniP-p (order p) from points[-1] to t, from the last p data predictions."""
    step = ExpStep(points[-1], t, data=True)
    rks = _unipc_ratios(points, order, step.h)
    if not rks:
        return step.first_order(x, outputs[-1])
    one = torch.ones_like(step.h)
    r, b, b_h = _unipc_system(torch.stack(rks + [one]), step, variant)
    rhos = torch.full_like(one, 0.5)[None] if order == 2 else _solve(r[:-1, :-1], b[:-1])
    return _unipc_step(x, outputs, rhos, rks, step, b_h)


def unipc_correct(
    x: Tensor,
    points: Sequence[TimePoint],
    t: TimePoint,
    outputs: Sequence[Tensor],
    m_t: Tensor,
    order: int,
    variant: str,
) -> Tensor:
    """The corrector UniC-p: redo the step from points[-1] (state ``x``) to t using m_t, the
    output at the predicted point, too. It raises the order by one and costs no evaluation,
    since m_t is the output the next predictor needs anyway."""
    step = ExpStep(points[-1], t, data=True)
    rks = _unipc_ratios(points, order, step.h)
    one = torch.ones_like(step.h)
    r, b, b_h = _unipc_system(torch.stack(rks + [one]), step, variant)
    rhos = torch.full_like(one, 0.5)[None] if order == 1 else _solve(r, b)
    return _unipc_step(x, outputs, rhos, rks, step, b_h, m_t)


# --- iPNDM (Zhang & Chen 2022, DEIS; Liu et al. 2022, PNDM) ------------------------------------------

# Adams-Bashforth weights for equal steps, newest output first.
IPNDM_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm_update(
    x: Tensor, s: TimePoint, t: TimePoint, eps_history: Sequence[Tensor], order: int
) -> Tensor:
    """One iPNDM step of the ODE dx̄/dσ̄ = eps in x̄ = x/alpha and σ̄ = sigma/alpha (DDIM eq. 14).

    The increment is an Adams-Bashforth combination of the last ``order`` noise predictions
    (newest last in ``eps_history``) with the equal-step weights, as iPNDM uses them on any grid.
    """
    eps = sum(c * e for c, e in zip(IPNDM_COEFFICIENTS[order], reversed(eps_history[-order:])))
    x_bar = x / s.alpha + (t.sigma / t.alpha - s.sigma / s.alpha) * eps
    return t.alpha * x_bar


# --- DDPM ancestral sampling (Ho et al. 2020) ---------------------------------------------------------


def ddpm_update(
    x: Tensor,
    s: TimePoint,
    t: TimePoint,
    x0: Tensor,
    generator: torch.Generator | None,
    add_noise: bool = True,
) -> Tensor:
    """One ancestral step from s to t < s: a draw from q(x_t | x_s, x0) with the predicted x0.

    With alpha_{s|t} = alpha_s / alpha_t and sigma2_{s|t} = sigma_s^2 - alpha_{s|t}^2 sigma_t^2,
    the posterior has mean (alpha_{s|t} sigma_t^2 x_s + alpha_t sigma2_{s|t} x0) / sigma_s^2 and
    variance sigma2_{s|t} sigma_t^2 / sigma_s^2 (Ho et al. 2020, eq. 7). The last step returns
    the mean, as DDPM's final step does.
    """
    alpha_st = s.alpha / t.alpha
    var_st = s.sigma**2 - alpha_st**2 * t.sigma**2
    mean = (alpha_st * t.sigma**2 * x + t.alpha * var_st * x0) / s.sigma**2
    if not add_noise:
        return mean
    var = (var_st * t.sigma**2 / s.sigma**2).clamp(min=0)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + var.sqrt() * z
