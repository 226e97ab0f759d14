"""Learned solver coefficients: one scalar per step that rescales the multistep correction.

Step i of the replay takes x_1 + (1 + c_i)(x_hi - x_1), x_1 the first-order (DDIM) step and
x_hi the solver's own (:class:`pdm.sampling.catalog.CorrectedSolver`); the c_i are fitted on
calibration images against the accurate ODE solution and checked on validation images. This is
the smallest member of the family that learns solver coefficients for a fixed budget (S4S,
Frankel et al. 2025, learns every multistep coefficient; AMED-Plugin and PAS learn a few per-step
scalars): nfe - 1 numbers, no network training, and c = 0 is the plain solver, so the search
starts from it. The first step (order 1) has no correction to rescale.
"""

from __future__ import annotations

from collections.abc import Callable

from pdm.calibration.search import coordinate_search


def fit_corrections(
    score: Callable[[list[float]], float],
    steps: int,
    validate: Callable[[list[float]], float] | None,
    start: float = 0.125,
    halvings: int = 3,
    sweeps: int = 4,
    limit: float = 0.25,
) -> tuple[list[float], float]:
    """Coordinate descent on the per-step corrections from all zeros
    (:func:`~pdm.calibration.search.coordinate_search`); no c_i leaves [-limit, limit] (measured
    on the exact mixture: unbounded corrections reached 0.69 and sent 1 of 64 new images into
    another mode). Returns (corrections, score)."""

    def propose(c: list[float], i: int, delta: float) -> list[float] | None:
        cand = list(c)
        cand[i] += delta
        return None if abs(cand[i]) > limit + 1e-12 else cand

    return coordinate_search(
        [0.0] * steps,
        score,
        start,
        range(1, steps),
        propose,
        halvings=halvings,
        max_sweeps=sweeps,
        validate=validate,
    )
