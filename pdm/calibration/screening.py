"""Calibration images that represent the hard tail: screen many seeds, keep the hardest, weigh them.

A calibrated time grid is fitted to its calibration images. When those are a plain random
draw, a rare kind of trajectory (on the digits model about one image in fifty, whose sample
depends strongly on the steps taken at high noise) is usually absent, and the fitted grid can
be much worse than a built-in grid on exactly those images: measured on 48 held-out digits
seeds at 20 NFE, one image carried most of the calibrated path's RMS error (benchmarks/RESULTS.md).

The remedy tried here is stratified sampling, the textbook way to estimate a mean dominated by a
rare stratum. :func:`screening_scores` solves ``N`` candidate images cheaply twice (a few-step
solve and a finer one) and takes their disagreement as a score of how hard each image is.
:func:`stratified_draw` then puts the ``k`` highest-scoring candidates (the *hard stratum*)
into the calibration set beside images drawn at random from the other ``N - k``, and gives every
image the weight that makes the weighted mean squared error an unbiased estimate of the mean
over all images: a hard image stands for itself (k/N of the mass shared by the k of them), a
random one for (N - k)/m of the candidates. The fitting and the validation images are drawn
this way separately, so both see the tail and both estimate the same population error.

Measured on digits (benchmarks/RESULTS.md) it did not protect new images. On one checkpoint the
images that carry the held-out RMS were rarer than 1 in 256 candidates and the score did not
single them out; on a retrained one it ranks them first (its top 8 of 200 held 65-96% of a
calibrated path's squared error), yet a path fitted with them was no better on new hard images,
each of which errs at its own time. It is therefore not on calibrate.py's command line:
``calibrate_budgets(..., weights=draw.weights)`` screens from Python, as
benchmarks/calibration_holdout.py --screen does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pdm.sampling.sampler import sample
from pdm.schedule import VPSchedule


def screening_scores(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    model_kwargs: dict[str, Tensor] | None = None,
    prediction: str = "eps",
    steps: int = 10,
    batch: int = 256,
    progress: bool = False,
) -> Tensor:
    """How hard each image of ``noise`` is to sample in few steps: the RMS per image between
    iPNDM-3 with ``steps`` evaluations on the logSNR grid and UniPC-3 with four times as many
    (float64, one value per row). Costs 5 * ``steps`` network evaluations per image."""
    from tqdm.auto import tqdm

    model_kwargs = dict(model_kwargs or {})
    out = []
    starts = range(0, noise.shape[0], batch)
    for start in tqdm(starts, desc="calibration: screening", disable=not progress, leave=False):
        rows = slice(start, start + batch)
        kw = dict(
            prediction=prediction,
            model_kwargs={k: v[rows] for k, v in model_kwargs.items()},
            skip_type="logSNR",
        )
        with torch.no_grad():
            cheap = sample(
                model_fn, noise[rows], schedule, steps=steps, solver="ipndm", order=3, **kw
            ).x
            fine = sample(
                model_fn, noise[rows], schedule, steps=4 * steps, solver="unipc", order=3, **kw
            ).x
        out.append((cheap - fine).double().flatten(1).pow(2).mean(1).sqrt().cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class Draw:
    """Which candidates calibrate (``fit``) and validate (``validation``), and their weights
    (each part's weights sum to 1; the weighted MSE estimates the mean over all candidates)."""

    fit: list[int]
    validation: list[int]
    fit_weights: list[float]
    validation_weights: list[float]
    hard: list[int]

    @property
    def indices(self) -> list[int]:
        """Fitting images first, then validation images (the layout calibrate_budgets splits)."""
        return self.fit + self.validation

    @property
    def weights(self) -> Tensor:
        return torch.tensor(self.fit_weights + self.validation_weights, dtype=torch.float64)


def stratified_draw(
    scores: Tensor, fit: int, validation: int, hard_fraction: float = 0.25, seed: int = 0
) -> Draw:
    """Draw ``fit`` + ``validation`` of the ``len(scores)`` candidates: in each part a share
    ``hard_fraction`` from the highest scores (the hard stratum, the same share of both parts),
    the rest uniformly at random from the other candidates; weights as in the module docstring.

    With as many candidates as images there is nothing to screen: every candidate is taken
    (in order) with equal weights.
    """
    n = scores.numel()
    if fit < 1 or validation < 0:
        raise ValueError(
            f"need at least one fitting image and no negative count, got {fit} and {validation}"
        )
    if fit + validation > n:
        raise ValueError(
            f"cannot draw {fit + validation} images from {n} candidates; screen at least as many"
        )
    if not 0.0 <= hard_fraction < 1.0:
        raise ValueError(f"the hard fraction must be in [0, 1), got {hard_fraction}")
    if fit + validation == n:
        return Draw(
            list(range(fit)),
            list(range(fit, n)),
            [1.0 / fit] * fit,
            [1.0 / validation] * validation if validation else [],
            [],
        )
    k_fit = min(fit - 1, round(hard_fraction * fit))
    k_val = min(max(validation - 1, 0), round(hard_fraction * validation))
    k = k_fit + k_val
    order = torch.argsort(scores.double(), descending=True, stable=True).tolist()
    hard, rest = order[:k], order[k:]
    g = torch.Generator().manual_seed(seed)
    hard = [
        hard[i] for i in torch.randperm(k, generator=g).tolist()
    ]  # which hard images validate: at random
    rest = [rest[i] for i in torch.randperm(n - k, generator=g).tolist()]
    m_fit, m_val = fit - k_fit, validation - k_val
    fit_rows = hard[:k_fit] + rest[:m_fit]
    val_rows = hard[k_fit:] + rest[m_fit : m_fit + m_val]

    def weights(k_part: int, m_part: int) -> list[float]:
        if k_part == 0:
            return [1.0 / m_part] * m_part if m_part else []
        return [k / n / k_part] * k_part + [(n - k) / n / m_part] * m_part

    return Draw(fit_rows, val_rows, weights(k_fit, m_fit), weights(k_val, m_val), sorted(order[:k]))
