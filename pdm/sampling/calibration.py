"""The greedy optimal skip path (AdaptiveDiffusion's reference, Ye et al. 2024, Sec. 3).

Given a model, a batch of seeds and a budget of K skipped steps, start from the full path and
K times add the one skip that least increases the final error against the full-path output.
It needs the full output and O(K * steps) sampling runs, so it is a yardstick for adaptive
criteria, not a sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pdm.sampling.sampler import sample
from pdm.sampling.skipping import SkipPath
from pdm.schedule import VPSchedule


def greedy_skip_path(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    budget: int,
    steps: int = 50,
    max_skips: int | None = None,
    error: Callable[[Tensor, Tensor], float] | None = None,
    progress: bool = False,
    **sample_kwargs,
) -> list[tuple[SkipPath, float]]:
    """Greedy paths for 1..budget skips: a list of (path, final error) after each addition.

    Args:
        budget: the number of skips K to add.
        max_skips: if given, never allow a run of more than this many consecutive skips.
        error: distance between a sample and the full-path sample (default: RMS per pixel).
        sample_kwargs: solver settings passed to :func:`pdm.sampling.sample` (steps is set here).
    """
    error = error or (lambda a, b: float((a - b).pow(2).mean().sqrt()))
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
            x = sample(model_fn, noise, schedule, steps=steps, skip=SkipPath(tuple(trial)), **sample_kwargs).x
            e = error(x, full)
            if best is None or e < best[0]:
                best = (e, i)
        if best is None:
            break
        evaluate[best[1]] = False
        history.append((SkipPath(tuple(evaluate)), best[0]))
        if progress:
            print(f"greedy: {round_ + 1} skips, skipped step {best[1] + 1}, error {best[0]:.3e}", flush=True)
    return history


def _longest_run(evaluate: list[bool]) -> int:
    longest = run = 0
    for e in evaluate:
        run = 0 if e else run + 1
        longest = max(longest, run)
    return longest
