"""Finding which evaluations of a fine grid to keep: calibrated skip paths and the greedy path.

:func:`calibrate_skip_path` picks, for a budget of ``nfe`` evaluations, the points of a fine
time grid where the network runs, by minimising the error against an accurate solution of
the ODE on calibration seeds. Keeping a subset of grid points is a learned time schedule:
the replayed path evaluates the model at the kept times only.

The search has three stages:
1. A dynamic programme over the grid. From the reference states x*(t_i) and the model's
   outputs there, the local error of every second-order multistep step (t_h, t_i -> t_j) is
   known without calling the network again. Each is weighted by how much of an error made at
   t_j survives to the end (the measured sensitivity of the final sample to a perturbation
   at t_j), and the path with the least weighted sum and exactly ``nfe`` steps is found in
   O(nfe * M * gap^2) time.
2. The DP path competes with every built-in grid of ``nfe`` steps mapped onto the fine grid;
   the one with the least true error on the calibration seeds goes on.
3. Local search on the true error: move one kept point by 1, 2 or 4 grid steps while the
   replayed path's error on the calibration seeds falls.
4. (``continuous=True``, with ``fill="merge"``) From the best of that path and the exact
   built-in grids of ``nfe`` steps (so the result never loses to them on the calibration
   seeds), the times leave the fine grid: each moves
   in lambda by a step that halves whenever no move lowers the true error (coordinate descent),
   so the result is a time grid of ``nfe`` steps tuned to the model and the solver (or, with
   ``time_search="warp"``, stages 1-3 are skipped and three smooth warp coefficients of the
   best built-in grid move instead, :mod:`pdm.sampling.time_search`). Measured on the digits
   model this stage takes the error well below what grid points of a 100-step grid allow
   (benchmarks/RESULTS.md).

:func:`greedy_skip_path` is AdaptiveDiffusion's yardstick (Ye et al. 2024, Sec. 3): add the
least harmful skip one at a time.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pdm.objectives import to_eps, to_x0
from pdm.sampling.catalog import solver_spec
from pdm.sampling.sampler import sample
from pdm.sampling.skipping import SkipPath
from pdm.sampling.solvers import TimePoint, first_order_update, multistep_second_update
from pdm.sampling.time_search import _say, _stage, refine_times, refine_warp, teleport_starts, teleported_start
from pdm.schedule import SKIP_TYPES, VPSchedule

ErrorFn = Callable[[Tensor, Tensor], float]
TIME_SEARCHES = ("free", "warp", "warp+free")


@dataclass
class Reference:
    """The accurate solution on a fine grid, computed once and shared by every budget calibrated
    on the same images (it costs most of a calibration): the states x*(t_i) and, once the first
    dynamic programme needs them, the network's outputs there (as the model predicts, so that
    budgets calibrated with solvers of either form share them) and the sensitivities."""

    grid: Tensor
    states: list[Tensor]
    outputs: list[Tensor] | None = None
    weights: list[float] | None = None

    def rows(self, index: slice) -> Reference:
        """The same solution for the images ``index`` (outputs and weights are recomputed)."""
        return Reference(self.grid, [s[index] for s in self.states])


def reference_for(model_fn: Callable[..., Tensor], noise: Tensor, schedule: VPSchedule, steps: int = 100,
                  progress: bool = False, **sample_kwargs) -> Reference:
    """:class:`Reference` states of ``noise`` on the ``steps``-step grid ``sample_kwargs`` describe."""
    sample_kwargs = {"skip_type": "logSNR", **sample_kwargs}
    grid = schedule.timesteps(steps, sample_kwargs["skip_type"], sample_kwargs.get("t_start"),
                              sample_kwargs.get("t_end"), dtype=noise.dtype, device=noise.device)
    with torch.no_grad():
        states = reference_states(model_fn, noise, schedule, grid, sample_kwargs.get("prediction", "eps"),
                                  dict(sample_kwargs.get("model_kwargs") or {}), progress=progress)
    return Reference(grid, states)


def rms(a: Tensor, b: Tensor, weights: Tensor | None = None) -> float:
    """RMS difference per pixel; with ``weights`` (one per image, summing to 1), the root of the
    weighted mean of the images' mean squares (:mod:`pdm.sampling.screening`)."""
    d = (a - b).double().pow(2)
    return float(d.mean().sqrt() if weights is None else (weights.to(d) * d.flatten(1).mean(1)).sum().sqrt())


def reference_states(model_fn: Callable[..., Tensor], noise: Tensor, schedule: VPSchedule, grid: Tensor,
                     prediction: str, model_kwargs: dict[str, Tensor], substeps: int = 9,
                     progress: bool = False) -> list[Tensor]:
    """x*(t_i) at every point of ``grid``: each interval solved accurately with third-order
    singlestep DPM-Solver (``substeps`` evaluations, logSNR inner grid) from the previous state."""
    states = [noise]
    for i in _stage(range(grid.numel() - 1), grid.numel() - 1, "reference solution", progress):
        x = sample(model_fn, states[-1], schedule, steps=substeps, solver="dpmsolver", order=3,
                   method="singlestep_fixed", skip_type="logSNR", t_start=float(grid[i]), t_end=float(grid[i + 1]),
                   prediction=prediction, model_kwargs=model_kwargs).x
        states.append(x)
    return states


def sensitivities(model_fn: Callable[..., Tensor], states: list[Tensor], schedule: VPSchedule, grid: Tensor,
                  prediction: str, model_kwargs: dict[str, Tensor], scale: float = 1e-3, steps: int = 12,
                  progress: bool = False) -> list[float]:
    """How much of a small perturbation of x*(t_i) reaches the final sample, for each grid point:
    RMS(x_end(x* + delta) - x_end(x*)) / RMS(delta), both ends solved with UniPC-3 on logSNR."""
    g = torch.Generator(device=states[0].device).manual_seed(0)
    out = []
    for i in _stage(range(grid.numel() - 1), grid.numel() - 1, "sensitivities", progress):
        delta = scale * torch.randn(states[i].shape, generator=g, dtype=states[i].dtype, device=states[i].device)
        kw = dict(steps=steps, solver="unipc", order=3, skip_type="logSNR", t_start=float(grid[i]),
                  t_end=float(grid[-1]), prediction=prediction, model_kwargs=model_kwargs)
        a = sample(model_fn, states[i], schedule, **kw).x
        b = sample(model_fn, states[i] + delta, schedule, **kw).x
        out.append(rms(a, b) / rms(delta, torch.zeros_like(delta)))
    return out + [1.0]


def _local_errors(states: list[Tensor], outputs: list[Tensor], points: list[TimePoint], data: bool,
                  max_gap: int, weights: list[float]) -> dict[tuple[int, int, int], float]:
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
                x_j = multistep_second_update(states[i], [points[h], points[i]], points[j], [outputs[h], outputs[i]],
                                              data, "dpmsolver")
                errors[(h, i, j)] = weights[j] * rms(x_j, states[j])
    return errors


def _cheapest_path(errors: dict[tuple[int, int, int], float], m: int, nfe: int, max_gap: int) -> list[int]:
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
        raise ValueError(f"no path of {nfe} steps reaches the end of a {m}-step grid with gaps of at most {max_gap}")
    key = min(ends, key=lambda e: best[nfe][e])
    path = [m]
    for k in range(nfe, 0, -1):
        path.append(key[0] if k > 1 else 0)
        key = prev[k][key]
    return sorted(set(path))


def path_from_points(points: list[int], m: int, **path_kwargs) -> SkipPath:
    """The SkipPath over an m-step grid that evaluates at the given grid points (the end excluded)."""
    keep = set(points) - {m}
    return SkipPath(tuple(i in keep for i in range(m)), **path_kwargs)


def calibrate_skip_path(model_fn: Callable[..., Tensor], noise: Tensor, schedule: VPSchedule, nfe: int,
                        steps: int = 100, max_gap: int | None = None, refine_sweeps: int = 4,
                        error: ErrorFn | None = None, progress: bool = False, fill: str = "merge",
                        continuous: bool = True, halvings: int = 5, reference: Reference | None = None,
                        validate: Callable[[Tensor], float] | None = None, time_search: str = "free",
                        **sample_kwargs) -> SkipPath:
    """The evaluations of a ``steps``-step grid to keep for a budget of ``nfe``, calibrated on ``noise``.

    Args:
        model_fn, noise, schedule: the model and the calibration seeds (never the seeds you score).
        nfe: network evaluations the path may spend (its kept grid points).
        steps: the fine grid's steps; ``sample_kwargs`` (solver, order, skip_type, prediction,
            model_kwargs, ...) describe it as for :func:`pdm.sampling.sample`. A grid dense in
            lambda at both ends (``logSNR``, the default here, or ``edm``) gives the search room.
        max_gap: the longest stretch of skipped steps (default: 2.5 times the mean gap).
        refine_sweeps: rounds of local search on the replayed path's true error.
        error: distance between a replayed sample and the reference (default: RMS per pixel).
        fill: how the replay fills skipped steps: ``merge`` (the solver steps between kept
            points, the setting the search models) or ``forecast`` / ``reuse``.
        continuous: with ``fill="merge"``, free the kept times from the fine grid (stage 4);
            the path then evaluates every step of its own grid of ``nfe`` steps, recorded in
            ``settings["timesteps"]``.
        halvings: how often stage 4 halves its step (first step: half a mean gap in lambda).
        reference: the accurate solution of ``noise`` on this grid (:func:`reference_for`), when
            several budgets are calibrated on the same images; computed here if None.
        validate: ``validate(times)``, the error of a time grid on validation images: stage 4
            stops at the step size where it is least (early stopping against over-fitting).
        time_search: stage 4's search: ``free`` (each time on its own, from the best of stage 3's
            path and the built-in grids), ``warp`` (three smooth warp coefficients of the best
            built-in grid, :mod:`pdm.sampling.time_search`; stages 1-3 are skipped, so only the
            reference's end states are needed) or ``warp+free`` (the warp, then the free search).
    Returns a :class:`SkipPath` whose ``settings`` record the grid, so it replays as found
    (:meth:`SkipPath.sample_kwargs` gives the arguments of :func:`sample` that replay it).
    """
    if time_search not in TIME_SEARCHES:
        raise ValueError(f"time_search must be one of {', '.join(TIME_SEARCHES)}, got {time_search!r}")
    if not 1 <= nfe <= steps:
        raise ValueError(f"nfe must be in 1..steps ({steps}), got {nfe}")
    error = error or rms
    sample_kwargs = {"skip_type": "logSNR", **sample_kwargs}
    max_gap = max_gap or max(2, math.ceil(2.5 * steps / nfe))
    reference = reference or reference_for(model_fn, noise, schedule, steps, progress, **sample_kwargs)
    grid, states = reference.grid, reference.states
    settings = {k: v for k, v in sample_kwargs.items() if k in ("solver", "order", "skip_type", "method",
                                                                 "solver_type")} | {"steps": steps}
    replay = dict(fill=fill, settings=settings)
    with torch.no_grad():
        target = states[-1]

        def score(pts: list[int]) -> float:
            path = path_from_points(pts, steps, **replay)
            return error(sample(model_fn, noise, schedule, steps=steps, skip=path, **sample_kwargs).x, target)

        smooth = time_search != "free" and continuous and fill == "merge"
        if not smooth:  # the warps start from a smooth built-in grid: no fine-grid path is needed
            candidates = [_dp_path(model_fn, noise, schedule, reference, nfe, max_gap, sample_kwargs, progress)]
            candidates += [_mapped_grid(schedule, grid, nfe, skip_type, sample_kwargs) for skip_type in SKIP_TYPES]
            scored = sorted((score(c), c) for c in {tuple(c) for c in candidates if len(c) == nfe + 1})
            _say(progress, f"start error {scored[0][0]:.3e} (of {len(scored)} candidates)")
            path_points, best = _refine(list(scored[0][1]), steps, max_gap, score, refine_sweeps, progress,
                                        scored[0][0])
            if not continuous or fill != "merge":
                return path_from_points(path_points, steps, **replay)

        def score_times(times: Tensor) -> float:
            kw = {k: v for k, v in sample_kwargs.items() if k not in ("steps", "timesteps")}
            return error(sample(model_fn, noise, schedule, steps=nfe, timesteps=times, **kw).x, target)

        # the search starts from the best of the path found so far and the exact built-in grids
        # (with a teleport, also the built-in grids from a few later starts)
        teleport = sample_kwargs.get("teleport")
        firsts = [float(grid[0])] + ([] if teleport is None else teleport_starts(schedule, float(grid[0])))
        starts = [] if smooth else [(best, grid[path_points])]
        starts += [(score_times(g), g) for g in (schedule.timesteps(nfe, st, t0, float(grid[-1]), dtype=torch.float64)
                                                 for st in SKIP_TYPES for t0 in firsts)]
        searches = [min(starts, key=lambda c: c[0])]
        if teleport is not None:  # a second search, from the best start below t_max: the local moves
            searches.append(teleported_start(starts, searches[0], schedule, score_times, nfe))  # rarely get there
        best, times = _refined(searches, schedule, score_times, time_search, halvings, progress, validate,
                               teleport is not None)
    settings = {k: v for k, v in settings.items() if k != "skip_type"}
    settings |= {"steps": nfe, "timesteps": [float(t) for t in times]}
    teleport = sample_kwargs.get("teleport") if float(times[0]) < schedule.t_max else None
    if teleport is not None:
        settings["teleport"] = teleport.record()
    return SkipPath((True,) * nfe, fill="merge", settings=settings, teleport=teleport)


def _refined(searches: list[tuple[float, Tensor]], schedule: VPSchedule, score_times: Callable[[Tensor], float],
             time_search: str, halvings: int, progress: bool, validate: Callable[[Tensor], float] | None,
             free_start: bool) -> tuple[float, Tensor]:
    """Stage 4 from each (error, grid) start; of several results the one with the least
    validation error (the least fitting error without validation images)."""
    found = []
    for best, times in searches:
        if time_search in ("warp", "warp+free"):
            times, best, _ = refine_warp(times, schedule, score_times, best, halvings=halvings, validate=validate)
            _say(progress, f"smooth warp of the grid: error {best:.3e}")
        if time_search in ("free", "warp+free"):
            times, best = refine_times(times, schedule, score_times, best, halvings, progress, validate,
                                       free_start=free_start)
        found.append((best, times))
    if len(found) == 1 or validate is None:
        return min(found, key=lambda c: c[0])
    return min(found, key=lambda c: validate(c[1]))


def _dp_path(model_fn, noise, schedule, reference: Reference, nfe, max_gap, sample_kwargs,
             progress: bool = False) -> list[int]:
    """Stage 1: the path of least sensitivity-weighted local error (outputs and sensitivities are
    computed once per reference and kept there for the next budget)."""
    prediction = sample_kwargs.get("prediction", "eps")
    kwargs = dict(sample_kwargs.get("model_kwargs") or {})
    grid, states = reference.grid, reference.states
    steps = grid.numel() - 1
    points = [TimePoint.at(schedule, t) for t in grid]
    data = solver_spec(sample_kwargs.get("solver", "dpmsolver++")).data
    if reference.outputs is None:
        reference.outputs = [model_fn(states[i], grid[i].expand(noise.shape[0]), **kwargs).to(noise.dtype)
                             for i in _stage(range(steps), steps, "network outputs", progress)]
        reference.weights = sensitivities(model_fn, states, schedule, grid, prediction, kwargs, progress=progress)
    convert = to_x0 if data else to_eps  # the solver's form (a budget before may have used the other)
    outputs = [convert(raw, states[i], points[i].alpha, points[i].sigma, prediction)
               for i, raw in enumerate(reference.outputs)]
    errors = _local_errors(states, outputs, points, data, max_gap, reference.weights)
    return _cheapest_path(errors, steps, nfe, max_gap)


def _mapped_grid(schedule: VPSchedule, grid: Tensor, nfe: int, skip_type: str, sample_kwargs: dict) -> list[int]:
    """A built-in grid of ``nfe`` steps moved to the nearest points of the fine grid (in lambda)."""
    coarse = schedule.timesteps(nfe, skip_type, float(grid[0]), float(grid[-1]), dtype=torch.float64)
    lam_fine, lam_coarse = schedule.lambda_(grid.double()), schedule.lambda_(coarse)
    idx = [int((lam_fine - lam).abs().argmin()) for lam in lam_coarse]
    idx[0], idx[-1] = 0, grid.numel() - 1
    return sorted(set(idx))


def _refine(points: list[int], m: int, max_gap: int, score: Callable[[list[int]], float], sweeps: int,
            progress: bool, best: float) -> tuple[list[int], float]:
    """Move single kept points by 1, 2 or 4 grid steps while the true error falls (first improvement)."""
    for sweep in range(sweeps):
        improved = False
        for k in _stage(range(1, len(points) - 1), len(points) - 2, f"sweep {sweep + 1}", progress):  # ends stay
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
        _say(progress, f"sweep {sweep + 1}: error {best:.3e}")
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
) -> list[tuple[SkipPath, float]]:
    """Greedy paths for 1..budget skips: a list of (path, final error) after each addition.

    Start from the full path and ``budget`` times add the one skip that least increases the
    error against the full-path output. It needs O(budget * steps) sampling runs, so it is a
    yardstick, not a sampler. ``max_skips`` bounds runs of consecutive skips.
    """
    error = error or rms
    full = sample(model_fn, noise, schedule, steps=steps, **sample_kwargs).x
    evaluate = [True] * steps
    history: list[tuple[SkipPath, float]] = []
    for round_ in range(budget):
        best: tuple[float, int] | None = None
        for i in range(1, steps):
            if not evaluate[i]:
                continue
            trial = evaluate.copy()
            trial[i] = False
            if max_skips is not None and _longest_run(trial) > max_skips:
                continue
            path = SkipPath(tuple(trial), fill="reuse")
            e = error(sample(model_fn, noise, schedule, steps=steps, skip=path, **sample_kwargs).x, full)
            if best is None or e < best[0]:
                best = (e, i)
        if best is None:
            break
        evaluate[best[1]] = False
        history.append((SkipPath(tuple(evaluate), fill="reuse"), best[0]))
        if progress:
            print(f"greedy: {round_ + 1} skips, skipped step {best[1] + 1}, error {best[0]:.3e}", file=sys.stderr, flush=True)
    return history


def _longest_run(evaluate: list[bool]) -> int:
    longest = run = 0
    for e in evaluate:
        run = 0 if e else run + 1
        longest = max(longest, run)
    return longest
