"""Calibration on a fine grid: which of its points the network should run at (stages 1-3 of
:func:`pdm.calibration.calibrate_schedule`), and the greedy skip pattern.

1. A dynamic programme over the grid. From the reference states x*(t_i) and the model's outputs
   there, the local error of every second-order multistep step (t_h, t_i -> t_j) is known without
   calling the network again. Each is weighted by how much of an error made at t_j survives to
   the end (the measured sensitivity of the final sample to a perturbation at t_j), and the path
   with the least weighted sum and exactly ``nfe`` steps is found in O(nfe * M * gap^2) time.
2. The DP path competes with every built-in grid of ``nfe`` steps mapped onto the fine grid; the
   one with the least true error on the calibration images goes on.
3. Local search on the true error: move one kept point by 1, 2 or 4 grid steps while the
   replayed path's error on the calibration images falls.

:func:`greedy_skip_path` is AdaptiveDiffusion's yardstick (Ye et al. 2024, Sec. 3): add the
least harmful skip one at a time.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from pdm.calibration.reference import Reference, rms, sensitivities
from pdm.calibration.search import say, stage
from pdm.objectives import to_eps, to_x0
from pdm.sampling.catalog import solver_spec
from pdm.sampling.sampler import sample
from pdm.sampling.settings import Settings
from pdm.sampling.skipping import FixedSkip
from pdm.sampling.solvers import TimePoint, first_order_update, multistep_second_update
from pdm.schedule import VPSchedule

ErrorFn = Callable[[Tensor, Tensor], float]


def grid_point_path(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    reference: Reference,
    nfe: int,
    max_gap: int,
    score: Callable[[list[int]], float],
    refine_sweeps: int,
    sample_kwargs: dict,
    progress: bool = False,
) -> tuple[list[int], float]:
    """Stages 1-3: the ``nfe + 1`` points of the reference's grid (its end included) with the least
    ``score`` found, and that score."""
    from pdm.schedule import SKIP_TYPES

    grid = reference.grid
    candidates = [
        _dp_path(model_fn, noise, schedule, reference, nfe, max_gap, sample_kwargs, progress)
    ]
    candidates += [_mapped_grid(schedule, grid, nfe, skip_type) for skip_type in SKIP_TYPES]
    scored = sorted((score(c), c) for c in {tuple(c) for c in candidates if len(c) == nfe + 1})
    say(progress, f"start error {scored[0][0]:.3e} (of {len(scored)} candidates)")
    return _refine(
        list(scored[0][1]), grid.numel() - 1, max_gap, score, refine_sweeps, progress, scored[0][0]
    )


def _local_errors(
    states: list[Tensor],
    outputs: list[Tensor],
    points: list[TimePoint],
    data: bool,
    max_gap: int,
    weights: list[float],
) -> dict[tuple[int, int, int], float]:
    """Local error of each multistep step from exact states: {(h, i, j): RMS}, h = -1 meaning a
    first-order first step. Second order is DPM-Solver(++)-2M's update (2211.01095 Alg. 2)."""
    m = len(points) - 1
    errors: dict[tuple[int, int, int], float] = {}
    for i in range(m):
        for j in range(i + 1, min(m, i + max_gap) + 1):
            if i == 0:
                first = first_order_update(states[0], points[0], points[j], outputs[0], data)
                errors[(-1, 0, j)] = weights[j] * rms(first, states[j])
                continue
            for h in range(max(0, i - max_gap), i):
                x_j = multistep_second_update(
                    states[i],
                    [points[h], points[i]],
                    points[j],
                    [outputs[h], outputs[i]],
                    data,
                    "dpmsolver",
                )
                errors[(h, i, j)] = weights[j] * rms(x_j, states[j])
    return errors


def _cheapest_path(
    errors: dict[tuple[int, int, int], float], m: int, nfe: int, max_gap: int
) -> list[int]:
    """The path 0 = p_0 < ... < p_nfe = m with the least summed local error (dynamic programme)."""
    inf = math.inf
    # best[k][(h, i)]: least cost of k steps ending with the step h -> i; back-pointers in prev
    best: list[dict[tuple[int, int], float]] = [{(-1, 0): 0.0}] + [dict() for _ in range(nfe)]
    prev: list[dict[tuple[int, int], tuple[int, int]]] = [dict() for _ in range(nfe + 1)]
    for k in range(nfe):
        for (h, i), cost in best[k].items():
            left = nfe - k - 1  # steps still to take after this one
            for j in range(i + 1, min(m, i + max_gap) + 1):
                if j + left > m or (m - j) > left * max_gap or (left == 0 and j != m):
                    continue
                c = cost + errors.get((h, i, j), inf)
                if c < best[k + 1].get((i, j), inf):
                    best[k + 1][(i, j)] = c
                    prev[k + 1][(i, j)] = (h, i)
    ends = [key for key in best[nfe] if key[1] == m]
    if not ends:
        raise ValueError(
            f"no path of {nfe} steps reaches the end of a {m}-step grid with gaps of at most {max_gap}"
        )
    key = min(ends, key=lambda e: best[nfe][e])
    path = [m]
    for k in range(nfe, 0, -1):
        path.append(key[0] if k > 1 else 0)
        key = prev[k][key]
    return sorted(set(path))


def _dp_path(
    model_fn,
    noise,
    schedule,
    reference: Reference,
    nfe,
    max_gap,
    sample_kwargs,
    progress: bool = False,
) -> list[int]:
    """Stage 1: the path of least sensitivity-weighted local error (outputs and sensitivities are
    computed once per reference and kept there for the next budget)."""
    prediction = sample_kwargs.get("prediction", "eps")
    kwargs = dict(sample_kwargs.get("model_kwargs") or {})
    grid, states = reference.grid, reference.states
    steps = grid.numel() - 1
    points = [TimePoint.at(schedule, t) for t in grid]
    data = solver_spec(sample_kwargs.get("solver", Settings().solver)).data
    if reference.outputs is None:
        reference.outputs = [
            model_fn(states[i], grid[i].expand(noise.shape[0]), **kwargs).to(noise.dtype)
            for i in stage(range(steps), steps, "network outputs", progress)
        ]
        reference.weights = sensitivities(
            model_fn, states, schedule, grid, prediction, kwargs, progress=progress
        )
    convert = (
        to_x0 if data else to_eps
    )  # the solver's form (a budget before may have used the other)
    outputs = [
        convert(raw, states[i], points[i].alpha, points[i].sigma, prediction)
        for i, raw in enumerate(reference.outputs)
    ]
    errors = _local_errors(states, outputs, points, data, max_gap, reference.weights)
    return _cheapest_path(errors, steps, nfe, max_gap)


def _mapped_grid(schedule: VPSchedule, grid: Tensor, nfe: int, skip_type: str) -> list[int]:
    """A built-in grid of ``nfe`` steps moved to the nearest points of the fine grid (in lambda)."""
    coarse = schedule.timesteps(
        nfe, skip_type, float(grid[0]), float(grid[-1]), dtype=torch.float64
    )
    lam_fine, lam_coarse = schedule.lambda_(grid.double()), schedule.lambda_(coarse)
    idx = [int((lam_fine - lam).abs().argmin()) for lam in lam_coarse]
    idx[0], idx[-1] = 0, grid.numel() - 1
    return sorted(set(idx))


def _refine(
    points: list[int],
    m: int,
    max_gap: int,
    score: Callable[[list[int]], float],
    sweeps: int,
    progress: bool,
    best: float,
) -> tuple[list[int], float]:
    """Move single kept points by 1, 2 or 4 grid steps while the true error falls (first improvement)."""
    for sweep in range(sweeps):
        improved = False
        for k in stage(
            range(1, len(points) - 1), len(points) - 2, f"sweep {sweep + 1}", progress
        ):  # ends stay
            for delta in (-4, -2, -1, 1, 2, 4):
                cand = points.copy()
                cand[k] += delta
                if cand[k] in points or not cand[k - 1] < cand[k] < cand[k + 1]:
                    continue
                if max(b - a for a, b in zip(cand, cand[1:])) > max_gap:
                    continue
                e = score(cand)
                if e < best:
                    points, best, improved = cand, e, True
        say(progress, f"sweep {sweep + 1}: error {best:.3e}")
        if not improved:
            break
    return points, best


def greedy_skip_path(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    budget: int,
    steps: int = 50,
    max_skips: int | None = None,
    error: ErrorFn | None = None,
    progress: bool = False,
    **sample_kwargs,
) -> list[tuple[FixedSkip, float]]:
    """Greedy paths for 1..budget skips: a list of (path, final error) after each addition.

    Start from the full path and ``budget`` times add the one skip that least increases the
    error against the full-path output. It needs O(budget * steps) sampling runs, so it is a
    yardstick, not a sampler. ``max_skips`` bounds runs of consecutive skips.
    """
    error = error or rms
    full = sample(model_fn, noise, schedule, steps=steps, **sample_kwargs).x
    evaluate = [True] * steps
    history: list[tuple[FixedSkip, float]] = []
    for round_ in range(budget):
        best: tuple[float, int] | None = None
        for i in range(1, steps):
            if not evaluate[i]:
                continue
            trial = evaluate.copy()
            trial[i] = False
            if max_skips is not None and _longest_run(trial) > max_skips:
                continue
            path = FixedSkip(tuple(trial))
            e = error(
                sample(model_fn, noise, schedule, steps=steps, skip=path, **sample_kwargs).x, full
            )
            if best is None or e < best[0]:
                best = (e, i)
        if best is None:
            break
        evaluate[best[1]] = False
        history.append((FixedSkip(tuple(evaluate)), best[0]))
        if progress:
            print(
                f"greedy: {round_ + 1} skips, skipped step {best[1] + 1}, error {best[0]:.3e}",
                file=sys.stderr,
                flush=True,
            )
    return history


def _longest_run(evaluate: list[bool]) -> int:
    longest = run = 0
    for e in evaluate:
        run = 0 if e else run + 1
        longest = max(longest, run)
    return longest
