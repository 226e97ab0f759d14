"""The continuous time searches of calibration: each time on its own, or a smooth warp.

:func:`refine_times` moves each of the N - 1 interior times of a grid on its own (coordinate
descent in lambda). At 20 NFE that is 19 parameters fitted to a few dozen images, and the grids
it finds are ragged (a long step beside a short one) in ways that fit the calibration images and
not new ones (benchmarks/RESULTS.md, issue #23). :func:`refine_warp` instead reads the start
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
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pdm.schedule import VPSchedule


def refine_times(times: Tensor, schedule: VPSchedule, score: Callable[[Tensor], float], best: float | None = None,
                 halvings: int = 5, progress: bool = False,
                 validate: Callable[[Tensor], float] | None = None,
                 free_start: bool = False) -> tuple[Tensor, float]:
    """Coordinate descent on a time grid: move each interior time in lambda by +-step while the
    ``score`` of the grid falls, and halve the step (``halvings`` times) when no move helps.

    The ends stay (with ``free_start`` the first time moves too, never above the schedule's
    t_max: a teleporting sampler starts where its grid does, :mod:`pdm.sampling.teleport`); the
    first step is half the mean gap in lambda and no time passes (or meets) a neighbour. With ``validate`` (the error on images the score does not see), the grid returned
    is the one, among the start and the end of each step size, whose validation error is least.
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

    def allowed(cand: Tensor, k: int) -> bool:
        if k == 0:
            return lam_top <= float(cand[0]) < float(lam[1]) - margin
        return float(lam[k - 1]) + margin < float(cand[k]) < float(lam[k + 1]) - margin

    kept = (validate(grid_of(lam)), lam, best) if validate is not None else None
    for level in range(halvings + 1):
        improved, sweeps = True, 0
        while improved and sweeps < 8:  # a bounded number of sweeps per step size
            improved, sweeps = False, sweeps + 1
            first = 0 if free_start else 1
            for k in _stage(range(first, n), n - first, f"times, step {step:.3g} in lambda", progress):
                for delta in (step, -step):
                    cand = lam.clone()
                    cand[k] = max(float(cand[k]) + delta, lam_top) if k == 0 else cand[k] + delta
                    if float(cand[k]) == float(lam[k]) or not allowed(cand, k):
                        continue
                    e = score(grid_of(cand))
                    if e < best:
                        lam, best, improved = cand, e, True
                        break
        if kept is not None:
            held_out = validate(grid_of(lam))
            kept = min(kept, (held_out, lam, best), key=lambda c: c[0])
            _say(progress, f"time step {step:.3g} in lambda, error {best:.3e}, validation {held_out:.3e}")
        else:
            _say(progress, f"time step {step:.3g} in lambda, error {best:.3e}")
        step /= 2
    if kept is not None:
        lam, best = kept[1], kept[2]
    return grid_of(lam), best


def warp_positions(steps: int, coeffs: Sequence[float]) -> Tensor:
    """w(k / steps) for k = 0..steps (float64): the warped positions in [0, 1] of a grid's points."""
    return _warped_index(steps, coeffs) / steps


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


def refine_warp(times: Tensor, schedule: VPSchedule, score: Callable[[Tensor], float], best: float | None = None,
                terms: int = 3, halvings: int = 5, step: float = 0.08,
                validate: Callable[[Tensor], float] | None = None) -> tuple[Tensor, float, list[float]]:
    """Coordinate descent on the ``terms`` warp coefficients of the grid ``times`` (decreasing,
    ends kept): move each coefficient by +-``step`` while ``score`` falls, halve the step when no
    move helps (``halvings`` times). With ``validate``, the grid kept is the one, among the start
    and the end of each step size, whose validation error is least (as in ``refine_times``).

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

    coeffs = [0.0] * terms
    best = score(times) if best is None else best
    kept = (validate(times), list(coeffs), best) if validate is not None else None
    for _ in range(halvings + 1):
        improved, sweeps = True, 0
        while improved and sweeps < 8:
            improved, sweeps = False, sweeps + 1
            for j in range(terms):
                for delta in (step, -step):
                    cand = list(coeffs)
                    cand[j] += delta
                    grid = grid_of(cand)
                    if grid is None:
                        continue
                    e = score(grid)
                    if e < best:
                        coeffs, best, improved = cand, e, True
                        break
        if kept is not None:
            held = validate(grid_of(coeffs))
            kept = min(kept, (held, list(coeffs), best), key=lambda c: c[0])
        step /= 2
    if kept is not None:
        coeffs, best = kept[1], kept[2]
    return grid_of(coeffs), best, [float(c) for c in coeffs]


def _stage(items, total: int, desc: str, progress: bool):
    """A progress bar on stderr over one stage of the calibration (silent unless ``progress``)."""
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=f"calibration: {desc}", file=sys.stderr, disable=not progress, leave=False)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"calibration: {message}", file=sys.stderr, flush=True)


def teleported_start(starts: list[tuple[float, Tensor]], best_start: tuple[float, Tensor], schedule: VPSchedule,
                      score_times: Callable[[Tensor], float], nfe: int) -> tuple[float, Tensor]:
    """The best start that teleports: the built-in grids from later first times, and the best
    start's grid teleported to its second time with the freed evaluation splitting one of its
    steps (repeated while that helps)."""
    tele = [c for c in starts if float(c[1][0]) < schedule.t_max]
    best, times = best_start
    for i in range(nfe - 1):  # the first move is always a candidate; later ones while they help
        e, later = min(((score_times(g), g) for g in _first_moved_inside(times, schedule)), key=lambda c: c[0])
        tele.append((e, later))
        if i > 0 and e >= best:
            break
        best, times = e, later
    return min(tele, key=lambda c: c[0])


def _first_moved_inside(times: Tensor, schedule: VPSchedule) -> list[Tensor]:
    """The grids that start at ``times[1]`` and split one of its steps in two (at its middle in
    lambda): one grid per step."""
    lam = schedule.lambda_(times[1:].double())
    grids = []
    for k in range(lam.numel() - 1):
        split = torch.cat([lam[:k + 1], ((lam[k] + lam[k + 1]) / 2).reshape(1), lam[k + 1:]])
        grid = schedule.t_of_lambda(split).double()
        grid[0], grid[-1] = times[1], times[-1]
        grids.append(grid)
    return grids


def teleport_starts(schedule: VPSchedule, t_first: float) -> list[float]:
    """Later first times for a teleporting search to start from: 0.5 to 3 above the first
    time's half log-SNR (on digits the best plain grids gained most from 1.5 to 2.5 above t_max's)."""
    lam0 = float(schedule.lambda_(torch.tensor(t_first, dtype=torch.float64)))
    return [float(schedule.t_of_lambda(torch.tensor(lam0 + d, dtype=torch.float64))) for d in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)]
