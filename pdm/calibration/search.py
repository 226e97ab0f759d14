"""The one search of calibration: coordinate descent with a halving step, kept honest by
validation images.

Times (each on its own, or a smooth warp of a grid) and solver coefficients are all fitted the
same way: move one parameter by +-step while the error on the fitting images falls (first
improvement), halve the step when a sweep finds nothing, and, when validation images are given,
return the parameters (among the start and the end of each step size) whose validation error is
least: early stopping against over-fitting a few dozen images.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

P = TypeVar("P")  # the parameters: a list of floats, or a tensor of lambdas


def coordinate_search(
    start: P,
    score: Callable[[P], float],
    step: float,
    coords: Sequence[int],
    propose: Callable[[P, int, float], P | None],
    *,
    best: float | None = None,
    halvings: int = 5,
    max_sweeps: int = 8,
    validate: Callable[[P], float] | None = None,
    start_validation: float | None = None,
    on_level: Callable[[float, float, float | None], None] | None = None,
    sweep_items: Callable[[Sequence[int], float], Sequence[int]] | None = None,
) -> tuple[P, float]:
    """Minimise ``score`` from ``start`` one coordinate at a time.

    Args:
        start: the first parameters (``best`` is their score; computed when None).
        score: the error on the fitting images of some parameters.
        step: the first step; it halves ``halvings`` times.
        coords: the coordinates that move, in sweep order.
        propose: ``propose(params, k, delta)``: the parameters with coordinate k moved by ``delta``,
            or None when that move is not allowed (or changes nothing).
        max_sweeps: sweeps per step size at most (a sweep that improves nothing ends the level).
        validate: the error on images the score does not see; the result is the point with the
            least of it among the start and the end of each step size (``start_validation``, when
            given, is the start's).
        on_level: ``on_level(step, best, validation_error)`` after each step size (progress).
        sweep_items: wraps ``coords`` for each sweep (a progress bar), given the step.
    Returns the parameters and their score on the fitting images.
    """
    params = start
    best = score(params) if best is None else best
    if validate is not None:
        kept = (validate(params) if start_validation is None else start_validation, params, best)
    else:
        kept = None
    for _ in range(halvings + 1):
        improved, sweeps = True, 0
        while improved and sweeps < max_sweeps:
            improved, sweeps = False, sweeps + 1
            for k in sweep_items(coords, step) if sweep_items is not None else coords:
                for delta in (step, -step):
                    cand = propose(params, k, delta)
                    if cand is None:
                        continue
                    e = score(cand)
                    if e < best:
                        params, best, improved = cand, e, True
                        break
        held_out = None
        if kept is not None:
            held_out = validate(params)
            kept = min(kept, (held_out, params, best), key=lambda c: c[0])
        if on_level is not None:
            on_level(step, best, held_out)
        step /= 2
    if kept is not None:
        params, best = kept[1], kept[2]
    return params, best


def stage(items, total: int, desc: str, progress: bool):
    """Progress over one stage of the calibration on stderr (silent unless ``progress``): a bar on
    a terminal; in a log file (a batch job's) a line every 30 s and at the end, since a bar's
    carriage returns would make one enormous line there."""
    from tqdm.auto import tqdm

    if progress and not sys.stderr.isatty():
        return _logged(items, total, f"calibration: {desc}")
    return tqdm(
        items,
        total=total,
        desc=f"calibration: {desc}",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )


def _logged(items, total: int, desc: str, every: float = 30.0):
    """``items``, with a plain line of progress on stderr every ``every`` seconds and at the end."""
    import time

    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every or done == total:
            print(f"{desc}: {done}/{total} ({now - start:.0f} s)", file=sys.stderr, flush=True)
            last = now


def say(progress: bool, message: str) -> None:
    """One line of calibration progress on stderr (silent unless ``progress``)."""
    if progress:
        print(f"calibration: {message}", file=sys.stderr, flush=True)
