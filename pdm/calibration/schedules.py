"""Learning one budget's schedule: :func:`calibrate_schedule`.

For a budget of ``nfe`` network evaluations it finds the times at which the network runs by
minimising the error against an accurate ODE solution of calibration images:

1-3. Points of a fine grid (``steps`` steps of ``skip_type``): a dynamic programme on the
     reference, the built-in grids mapped onto it, then a local search on the true error
     (:mod:`pdm.calibration.grid_points`).
4.   (``continuous=True``) From the best of that path and the exact built-in grids of ``nfe``
     steps (so the result never loses to them on the calibration images), the times leave the
     grid: each moves in lambda by a step that halves whenever no move helps
     (:func:`pdm.calibration.times.refine_times`); ``time_search="warp"`` moves three smooth warp
     coefficients of the best built-in grid instead (stages 1-3 are then skipped). With a
     teleport, a second search starts from the best start below t_max.

Measured on the digits model, stage 4 takes the error well below what points of a 100-step grid
allow (benchmarks/RESULTS.md). The result is a :class:`~pdm.sampling.LearnedSchedule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from pdm.calibration.grid_points import ErrorFn, grid_point_path
from pdm.calibration.memory import RecallingModel
from pdm.calibration.reference import Reference, reference_for, rms
from pdm.calibration.search import say
from pdm.calibration.teleport import teleport_starts, teleported_start
from pdm.calibration.times import refine_times, refine_warp
from pdm.sampling.learned import LearnedSchedule
from pdm.sampling.sampler import sample
from pdm.sampling.settings import Settings
from pdm.schedule import SKIP_TYPES, VPSchedule

TIME_SEARCHES = ("free", "warp", "warp+free")
SOLVER_KEYS = (
    "solver",
    "order",
    "solver_type",
    "method",
)  # what a schedule replays of sample_kwargs


def calibrate_schedule(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    nfe: int,
    steps: int = 100,
    max_gap: int | None = None,
    refine_sweeps: int = 4,
    error: ErrorFn | None = None,
    progress: bool = False,
    continuous: bool = True,
    halvings: int = 5,
    reference: Reference | None = None,
    validate: Callable[[Tensor], float] | None = None,
    time_search: str = "free",
    **sample_kwargs,
) -> LearnedSchedule:
    """The schedule of ``nfe`` evaluations for ``model_fn``, calibrated on ``noise``.

    Args:
        model_fn, noise, schedule: the model and the calibration seeds (never the seeds you score).
        nfe: network evaluations the schedule may spend.
        steps: the fine grid's steps; ``sample_kwargs`` (solver, order, skip_type, prediction,
            model_kwargs, teleport, ...) describe it and the solver as for :func:`pdm.sampling.sample`.
            A grid dense in lambda at both ends (``logSNR``, the default here, or ``edm``) gives
            the search room.
        max_gap: the longest stretch of skipped fine-grid steps (default: 2.5 times the mean gap).
        refine_sweeps: rounds of stage 3's local search.
        error: distance between a replayed sample and the reference (default: RMS per pixel).
        continuous: free the times from the fine grid (stage 4); else the schedule keeps grid points.
        halvings: how often stage 4 halves its step (first step: half a mean gap in lambda).
        reference: the accurate solution of ``noise`` on the fine grid
            (:func:`~pdm.calibration.reference.reference_for`), when several budgets share it.
        validate: ``validate(times)``, the error of a time grid on validation images: stage 4
            stops at the step size where it is least (early stopping against over-fitting).
        time_search: stage 4's search: ``free``, ``warp`` or ``warp+free`` (see the module docstring).
    """
    if time_search not in TIME_SEARCHES:
        raise ValueError(
            f"time_search must be one of {', '.join(TIME_SEARCHES)}, got {time_search!r}"
        )
    if not 1 <= nfe <= steps:
        raise ValueError(f"nfe must be in 1..steps ({steps}), got {nfe}")
    sample_kwargs = {"skip_type": "logSNR", **sample_kwargs}
    teleport = sample_kwargs.pop("teleport", None)
    reference = reference or reference_for(
        model_fn, noise, schedule, steps, progress, **sample_kwargs
    )
    search = _Scores(model_fn, noise, schedule, reference, error or rms, sample_kwargs, teleport)
    solver = {k: v for k, v in sample_kwargs.items() if k in SOLVER_KEYS}
    starts = []
    with torch.no_grad():
        if time_search == "free" or not continuous:  # the warps start from smooth built-in grids
            max_gap = max_gap or max(2, math.ceil(2.5 * steps / nfe))
            points, best = grid_point_path(
                model_fn,
                noise,
                schedule,
                reference,
                nfe,
                max_gap,
                search.points,
                refine_sweeps,
                sample_kwargs,
                progress,
            )
            if not continuous:
                fine = Settings.from_keywords(
                    steps=steps, skip_type=sample_kwargs["skip_type"], **solver
                )
                return LearnedSchedule(fine, tuple(points[:-1]))
            starts.append((best, reference.grid[list(points)]))
        starts += search.built_in_starts(nfe)
        searches = [min(starts, key=lambda c: c[0])]
        if teleport is not None:  # a second search from the best start below t_max, where local
            searches.append(
                teleported_start(starts, searches[0], schedule, search.times, nfe)
            )  # moves rarely go
        best, times = _refined(
            searches,
            schedule,
            search.times,
            time_search,
            halvings,
            progress,
            validate,
            teleport is not None,
        )
    teleport = teleport if float(times[0]) < schedule.t_max else None
    found = Settings.from_keywords(steps=nfe, timesteps=times, **solver)
    return LearnedSchedule(replace(found, teleport=teleport))


class _Scores:
    """The error on the calibration images of a schedule given as points of the reference's fine
    grid (:meth:`points`) or as free times (:meth:`times`); a teleport's starts are answered from
    memory (candidates repeat them)."""

    def __init__(
        self,
        model_fn: Callable[..., Tensor],
        noise: Tensor,
        schedule: VPSchedule,
        reference: Reference,
        error: ErrorFn,
        sample_kwargs: dict,
        teleport,
    ) -> None:
        self.model_fn, self.noise, self.schedule, self.reference = (
            model_fn,
            noise,
            schedule,
            reference,
        )
        self.error, self.teleport = error, None if teleport is None else RecallingModel(teleport)
        self.kw = {k: v for k, v in sample_kwargs.items() if k not in ("steps", "timesteps")}

    def _error(self, times: Tensor, teleport=None) -> float:
        run = sample(
            self.model_fn,
            self.noise,
            self.schedule,
            steps=times.numel() - 1,
            timesteps=times,
            teleport=teleport,
            **self.kw,
        )
        return self.error(run.x, self.reference.states[-1])

    def points(self, points: list[int]) -> float:
        return self._error(self.reference.grid[list(points)])

    def times(self, times: Tensor) -> float:
        return self._error(times, self.teleport)

    def built_in_starts(self, nfe: int) -> list[tuple[float, Tensor]]:
        """(error, grid) of every built-in grid of ``nfe`` steps (with a teleport, also from a few
        later first times)."""
        grid = self.reference.grid
        firsts = [float(grid[0])]
        if self.teleport is not None:
            firsts += teleport_starts(self.schedule, float(grid[0]))
        grids = [
            self.schedule.timesteps(nfe, kind, t0, float(grid[-1]), dtype=torch.float64)
            for kind in SKIP_TYPES
            for t0 in firsts
        ]
        return [(self.times(g), g) for g in grids]


calibrate_skip_path = calibrate_schedule  # the earlier name


def _refined(
    searches: list[tuple[float, Tensor]],
    schedule: VPSchedule,
    score_times: Callable[[Tensor], float],
    time_search: str,
    halvings: int,
    progress: bool,
    validate: Callable[[Tensor], float] | None,
    free_start: bool,
) -> tuple[float, Tensor]:
    """Stage 4 from each (error, grid) start; of several results the one with the least
    validation error (the least fitting error without validation images)."""
    found = []
    for best, times in searches:
        if time_search in ("warp", "warp+free"):
            times, best, _ = refine_warp(
                times, schedule, score_times, best, halvings=halvings, validate=validate
            )
            say(progress, f"smooth warp of the grid: error {best:.3e}")
        if time_search in ("free", "warp+free"):
            times, best = refine_times(
                times,
                schedule,
                score_times,
                best,
                halvings,
                progress,
                validate,
                free_start=free_start,
            )
        found.append((best, times))
    if len(found) == 1 or validate is None:
        return min(found, key=lambda c: c[0])
    return min(found, key=lambda c: validate(c[1]))
