"""Learning a teleport: the data Gaussian it flows, and where a teleporting search starts.

:class:`pdm.sampling.teleport.Teleport` replays the closed-form ODE of a Gaussian of the data
(Wang & Vastola 2023, arXiv:2311.10892); here the Gaussian's moments are fitted to training
images (:func:`fit_gaussian`), and the time search gets the starts below t_max it cannot reach
by local moves (:func:`teleported_start`, :func:`teleport_starts`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pdm.sampling.teleport import GaussianData
from pdm.schedule import VPSchedule


def fit_gaussian(
    x: Tensor, y: Tensor | None = None, num_classes: int | None = None, rank: int = 64
) -> GaussianData:
    """The low-rank moments of data ``x`` (N, *shape), per class of ``y`` when ``num_classes`` is
    given, then of the whole data set (the last row)."""
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 data images of shape (N, ...), got {tuple(x.shape)}")
    flat = x.flatten(1).double()
    if num_classes is not None and (y is None or y.shape != (x.shape[0],)):
        raise ValueError("class moments need one label per image (y of shape (N,))")
    groups = [flat[y == c] for c in range(num_classes)] if num_classes is not None else []
    for c, g in enumerate(groups):
        if g.shape[0] < 2:
            raise ValueError(f"class {c} has {g.shape[0]} data images; its moments need at least 2")
    rows = [_moments(g, rank) for g in groups + [flat]]
    return GaussianData(
        torch.stack([r[0] for r in rows]),
        torch.stack([r[1] for r in rows]),
        torch.stack([r[2] for r in rows]),
        torch.stack([r[3] for r in rows]),
        tuple(x.shape[1:]),
        num_classes,
    )


def _moments(flat: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, top-``rank`` directions, their variances, mean variance of the rest) of rows ``flat``."""
    n, d = flat.shape
    mu = flat.mean(0)
    _, sv, vh = torch.linalg.svd(flat - mu, full_matrices=False)
    var = sv**2 / (n - 1)
    k = min(rank, d)
    basis = torch.zeros(d, k, dtype=torch.float64)
    variances = torch.zeros(k, dtype=torch.float64)
    m = min(k, vh.shape[0])
    basis[:, :m], variances[:m] = vh[:m].T, var[:m]
    if m < k:  # fewer images than the rank: complete the basis with directions of zero variance
        q, _ = torch.linalg.qr(
            torch.cat(
                [
                    basis[:, :m],
                    torch.randn(
                        d, k - m, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
                    ),
                ],
                1,
            )
        )
        basis[:, m:] = q[:, m:]
    total = float((flat - mu).pow(2).sum() / (n - 1))
    residual = torch.tensor(
        max(total - float(variances.sum()), 0.0) / max(d - k, 1), dtype=torch.float64
    )
    return mu, basis, variances, residual


def teleported_start(
    starts: list[tuple[float, Tensor]],
    best_start: tuple[float, Tensor],
    schedule: VPSchedule,
    score_times: Callable[[Tensor], float],
    nfe: int,
) -> tuple[float, Tensor]:
    """The best start that teleports: the built-in grids from later first times, and the best
    start's grid teleported to its second time with the freed evaluation splitting one of its
    steps (repeated while that helps)."""
    tele = [c for c in starts if float(c[1][0]) < schedule.t_max]
    best, times = best_start
    for i in range(nfe - 1):  # the first move is always a candidate; later ones while they help
        e, later = min(
            ((score_times(g), g) for g in _first_moved_inside(times, schedule)), key=lambda c: c[0]
        )
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
        split = torch.cat([lam[: k + 1], ((lam[k] + lam[k + 1]) / 2).reshape(1), lam[k + 1 :]])
        grid = schedule.t_of_lambda(split).double()
        grid[0], grid[-1] = times[1], times[-1]
        grids.append(grid)
    return grids


def teleport_starts(schedule: VPSchedule, t_first: float) -> list[float]:
    """Later first times for a teleporting search to start from: 0.5 to 3 above the first
    time's half log-SNR (on digits the best plain grids gained most from 1.5 to 2.5 above t_max's)."""
    lam0 = float(schedule.lambda_(torch.tensor(t_first, dtype=torch.float64)))
    return [
        float(schedule.t_of_lambda(torch.tensor(lam0 + d, dtype=torch.float64)))
        for d in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    ]
