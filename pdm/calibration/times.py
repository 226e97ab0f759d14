"""The continuous time searches of calibration: each time on its own, or a smooth warp.

:func:`refine_times` moves each of the N - 1 interior times of a grid on its own (coordinate
descent in lambda). At 20 NFE that is 19 parameters fitted to a few dozen images, and the grids
it finds are ragged (a long step beside a short one) in ways that fit the calibration images and
not new ones (benchmarks/RESULTS.md). :func:`refine_warp` instead reads the start
grid at warped positions:

    lambda_k = Lambda(w(k / N)),   w(u) = u + sum_j c_j sin(j pi u),   j = 1..J,

where ``Lambda`` interpolates the start grid's lambdas linearly in u. The ends stay (sin(j pi u)
vanishes at 0 and 1), the grid stays ordered while w increases over the N + 1 points, and J
parameters (3 by default) describe it whatever N is: the issue's "shrink the number of free
parameters", with the smoothness of the step sizes in lambda built in rather than penalised.
Searching a time schedule per model is the idea of learned-discretisation work (GITS, Chen et
al. 2024; LD3, Tong et al. 2025); the parameterisation by a sine series of the start grid's
index is ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pdm.calibration.search import coordinate_search, say, stage
from pdm.schedule import VPSchedule


def refine_times(
    times: Tensor,
    schedule: VPSchedule,
    score: Callable[[Tensor], float],
    best: float | None = None,
    halvings: int = 5,
    progress: bool = False,
    validate: Callable[[Tensor], float] | None = None,
    free_start: bool = False,
) -> tuple[Tensor, float]:
    """Coordinate descent on a time grid (:func:`~pdm.calibration.search.coordinate_search`): move
    each interior time in lambda by +-step while the ``score`` of the grid falls, halving the step
    ``halvings`` times; with ``validate``, the grid kept is the one with the least validation error.

    The ends stay (with ``free_start`` the first time moves too, never above the schedule's
    t_max: a teleporting sampler starts where its grid does, :mod:`pdm.sampling.teleport`); the
    first step is half the mean gap in lambda and no time passes (or meets) a neighbour.
    Returns the grid (decreasing times, float64) and its score.
    """
    times = times.detach().double().cpu().clone()
    lam = schedule.lambda_(times)
    n = lam.numel() - 1
    best = score(times) if best is None else best
    step = 0.5 * float(lam[-1] - lam[0]) / n
    margin = 1e-3 * step  # neighbours stay apart (a move of whole steps can land on one)
    lam_top = float(schedule.lambda_(torch.tensor(schedule.t_max, dtype=torch.float64)))
    lam_first = float(lam[0])

    def grid_of(lams: Tensor) -> Tensor:
        grid = schedule.t_of_lambda(lams).double()
        grid[-1] = times[-1]
        if not free_start or float(lams[0]) == lam_first:
            grid[0] = times[0]  # exactly where it started (t_max itself: no teleport)
        elif float(lams[0]) <= lam_top:
            grid[0] = schedule.t_max
        return grid

    def propose(current: Tensor, k: int, delta: float) -> Tensor | None:
        cand = current.clone()
        cand[k] = max(float(cand[k]) + delta, lam_top) if k == 0 else cand[k] + delta
        if float(cand[k]) == float(current[k]):
            return None
        if k == 0:
            return cand if lam_top <= float(cand[0]) < float(current[1]) - margin else None
        return (
            cand
            if float(current[k - 1]) + margin < float(cand[k]) < float(current[k + 1]) - margin
            else None
        )

    def level(step: float, err: float, held_out: float | None) -> None:
        tail = "" if held_out is None else f", validation {held_out:.3e}"
        say(progress, f"time step {step:.3g} in lambda, error {err:.3e}{tail}")

    first = 0 if free_start else 1
    lam, best = coordinate_search(
        lam,
        lambda c: score(grid_of(c)),
        step,
        range(first, n),
        propose,
        best=best,
        halvings=halvings,
        validate=None if validate is None else (lambda c: validate(grid_of(c))),
        on_level=level,
        sweep_items=lambda coords, s: stage(
            coords, len(coords), f"times, step {s:.3g} in lambda", progress
        ),
    )
    return grid_of(lam), best


def _warped_index(steps: int, coeffs: Sequence[float]) -> Tensor:
    """steps * w(k / steps): exactly k where the warp is zero, and exactly 0 and steps at the ends."""
    k = torch.arange(steps + 1, dtype=torch.float64)
    shift = torch.zeros_like(k)
    for j, c in enumerate(coeffs, start=1):
        shift = shift + c * torch.sin(j * math.pi * k / steps)
    shift[0] = shift[-1] = 0.0
    return k + steps * shift


def warped_lambdas(start: Tensor, coeffs: Sequence[float]) -> Tensor | None:
    """The start grid's lambdas (increasing, float64) read at the warped positions; None when the
    warp does not keep the points strictly ordered (or leaves [0, 1])."""
    n = start.numel() - 1
    x = _warped_index(n, coeffs)
    if not bool((x[1:] > x[:-1]).all()) or float(x.min()) < 0 or float(x.max()) > n:
        return None
    lo = x.floor().clamp(max=n - 1).long()
    frac = x - lo
    return start[lo] + frac * (start[lo + 1] - start[lo])


def refine_warp(
    times: Tensor,
    schedule: VPSchedule,
    score: Callable[[Tensor], float],
    best: float | None = None,
    terms: int = 3,
    halvings: int = 5,
    step: float = 0.08,
    validate: Callable[[Tensor], float] | None = None,
) -> tuple[Tensor, float, list[float]]:
    """Coordinate descent on the ``terms`` warp coefficients of the grid ``times`` (decreasing,
    ends kept), by :func:`~pdm.calibration.search.coordinate_search` from all zeros (the grid itself).

    Returns (grid, its score, the coefficients)."""
    times = times.detach().double().cpu().clone()
    start = schedule.lambda_(times)

    def grid_of(coeffs: Sequence[float]) -> Tensor | None:
        lam = warped_lambdas(start, coeffs)
        if lam is None:
            return None
        grid = schedule.t_of_lambda(lam).double()
        grid[0], grid[-1] = times[0], times[-1]
        return grid if bool((grid[1:] < grid[:-1]).all()) else None

    def propose(current: list[float], j: int, delta: float) -> list[float] | None:
        cand = list(current)
        cand[j] += delta
        return cand if grid_of(cand) is not None else None

    best = score(times) if best is None else best
    coeffs, best = coordinate_search(
        [0.0] * terms,
        lambda c: score(grid_of(c)),
        step,
        range(terms),
        propose,
        best=best,
        halvings=halvings,
        validate=None if validate is None else (lambda c: validate(grid_of(c))),
        start_validation=None if validate is None else validate(times),
    )
    return grid_of(coeffs), best, [float(c) for c in coeffs]
