"""Learned solver coefficients: one scalar per step that rescales the multistep correction.

A multistep step of order p > 1 is the first-order (DDIM) step plus a correction built from the
older outputs: x_hi = x_1 + (x_hi - x_1). Here step i takes x_1 + (1 + c_i)(x_hi - x_1), with the
c_i fitted on calibration images against the accurate ODE solution and checked on validation
images (the fit stops at the step size where the validation error is least). This is the
smallest member of the family that learns solver coefficients for a fixed budget (S4S, Frankel
et al. 2025, learns every multistep coefficient; AMED-Plugin and PAS learn a few per-step
scalars): nfe - 1 numbers, no network training, and c = 0 is the plain solver, so the search
can only start from it. The first step (order 1) has no correction to rescale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from pdm.sampling.catalog import MultistepSolver
from pdm.sampling.solvers import TimePoint, first_order_update


class CorrectedSolver(MultistepSolver):
    """``base`` with its step i's correction scaled by 1 + ``corrections[i]`` (i from 0)."""

    def __init__(self, base: MultistepSolver, corrections: Sequence[float]) -> None:
        super().__init__(base.order, base.lower_order_final)
        self.base, self.corrections = base, [float(c) for c in corrections]
        self.data, self.corrects = base.data, base.corrects
        self.step = 0

    def order_at(self, i: int, steps: int) -> int:
        return self.base.order_at(i, steps)

    def predict(self, x: Tensor, points: Sequence[TimePoint], outputs: Sequence[Tensor], t: TimePoint,
                order: int, last: bool) -> Tensor:
        i, self.step = self.step, self.step + 1
        x_hi = self.base.predict(x, points, outputs, t, order, last)
        c = self.corrections[i] if i < len(self.corrections) else 0.0
        if order == 1 or c == 0.0:
            return x_hi
        x_1 = first_order_update(x, points[-1], t, outputs[-1], self.data)
        return x_1 + (1.0 + c) * (x_hi - x_1)

    def correct(self, x, points, outputs, t, m_t, order):
        return self.base.correct(x, points, outputs, t, m_t, order)


def fit_corrections(score: Callable[[list[float]], float], steps: int, validate: Callable[[list[float]], float] | None,
                    start: float = 0.125, halvings: int = 3, sweeps: int = 4,
                    limit: float = 0.25) -> tuple[list[float], float]:
    """Coordinate descent on the per-step corrections (all 0 at first): move each c_i by +-step
    while ``score`` falls, halve the step when no move helps; no c_i leaves [-limit, limit]
    (measured on the exact mixture: unbounded corrections reached 0.69 and sent 1 of 64 new
    images into another mode). With ``validate``, the result is the corrections, among the start
    and the end of each step size, with the least validation error. Returns (corrections, score)."""
    c = [0.0] * steps
    best = score(c)
    kept = (validate(c), list(c), best) if validate is not None else None
    step = start
    for _ in range(halvings + 1):
        for _ in range(sweeps):
            improved = False
            for i in range(1, steps):  # step 0 is first order: nothing to rescale
                for delta in (step, -step):
                    cand = list(c)
                    cand[i] += delta
                    if abs(cand[i]) > limit + 1e-12:
                        continue
                    e = score(cand)
                    if e < best:
                        c, best, improved = cand, e, True
                        break
            if not improved:
                break
        if kept is not None:
            kept = min(kept, (validate(c), list(c), best), key=lambda k: k[0])
        step /= 2
    if kept is not None:
        c, best = kept[1], kept[2]
    return c, best
