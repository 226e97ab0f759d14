"""The coefficients sampling needs at a time and across a step.

:class:`TimePoint` holds alpha, sigma, log alpha and lambda at one time (or one time per row, for
per-image step control); :class:`ExpStep` the exponential-integrator coefficients of one step in
the data or the noise form, so every solver's update reads the same in either form
(:mod:`pdm.sampling.solvers`). :func:`lanewise` computes per-row values so that their rounding
never depends on the row's neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pdm.schedule import VPSchedule

LANES = 64  # copies of each per-row value in lanewise(): whole SIMD vectors, never a scalar tail


def lanewise(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``fn`` (elementwise) of per-row values such that each result's rounding does not depend on
    where the row sits or which rows are beside it.

    CPU kernels compute transcendental functions (exp, expm1, log, pow) with vector code for whole
    vectors and scalar code for the tail, and the two can differ in the last bit. Spreading every
    value over ``LANES`` contiguous copies puts each one in whole vectors, so an image's step sizes
    and coefficients are the same whichever slot and batch-mates it has (per-image step control).
    0-d arguments (one time for the batch) are computed as they are."""
    if all(a.dim() == 0 for a in args):
        return fn(*args)
    shape = torch.broadcast_shapes(*(a.shape for a in args))
    wide = [a.expand(shape).reshape(-1, 1).expand(-1, LANES).contiguous() for a in args]
    return fn(*wide)[:, 0].reshape(shape)


@dataclass(frozen=True)
class TimePoint:
    """The marginal coefficients of one time t: alpha, sigma, log alpha and lambda."""

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    log_alpha: Tensor
    lambda_: Tensor

    @classmethod
    def at(cls, schedule: VPSchedule, t: Tensor) -> TimePoint:
        """The coefficients of the scalar time ``t`` (a 0-d tensor) in ``t``'s dtype."""
        log_alpha = schedule.log_alpha(t)
        return cls(
            t=t,
            alpha=torch.exp(log_alpha),
            sigma=schedule.sigma(t),
            log_alpha=log_alpha,
            lambda_=schedule.lambda_(t),
        )

    @classmethod
    def rows(cls, schedule: VPSchedule, t: Tensor, ndim: int) -> TimePoint:
        """One time per row: the coefficients of ``t`` (shape (n,)) shaped (n, 1, ..., 1) to
        broadcast against a batch of ``ndim`` dimensions (per-image step control)."""
        point = cls(
            *(
                lanewise(f, t)
                for f in (
                    lambda v: v,
                    lambda v: torch.exp(schedule.log_alpha(v)),
                    schedule.sigma,
                    schedule.log_alpha,
                    schedule.lambda_,
                )
            )
        )
        shape = (t.shape[0],) + (1,) * (ndim - 1)
        return cls(
            *(
                v.reshape(shape)
                for v in (point.t, point.alpha, point.sigma, point.log_alpha, point.lambda_)
            )
        )


class ExpStep:
    """Exponential-integrator coefficients of one step s -> t in the data or the noise form.

    ``first_order(x, m0)`` is DDIM / DPM-Solver-1. ``phi_1, phi_2, phi_3`` are the official
    code's h-scaled phi functions (phi_2 = phi_1/h + 1 and phi_3 = phi_2/h - 1/2 in the data
    form, phi_2 = phi_1/h - 1 in the noise form). ``sign`` is the sign the first difference
    D1 carries through phi_2: + in the data form, - in the noise form (2211.01095, App. B).
    ``hh`` is the signed step UniPC writes its coefficients in (-h data, +h noise).
    """

    def __init__(self, s: TimePoint, t: TimePoint, data: bool) -> None:
        self.h = h = t.lambda_ - s.lambda_
        if data:
            self.ratio, self.scale, self.hh, self.sign = t.sigma / s.sigma, t.alpha, -h, 1.0
            self.phi_1 = lanewise(lambda v: torch.expm1(-v), h)
            self.phi_2 = self.phi_1 / h + 1.0
        else:
            self.ratio, self.scale, self.hh, self.sign = (
                lanewise(torch.exp, t.log_alpha - s.log_alpha),
                t.sigma,
                h,
                -1.0,
            )
            self.phi_1 = lanewise(torch.expm1, h)
            self.phi_2 = self.phi_1 / h - 1.0
        self.phi_3 = self.phi_2 / h - 0.5

    def first_order(self, x: Tensor, m0: Tensor) -> Tensor:
        """The linear part solved exactly with the model output held at m0 (DDIM)."""
        return self.ratio * x - self.scale * self.phi_1 * m0
