"""The accurate solution every calibration error is measured against.

:func:`reference_for` solves the calibration images on a fine grid (each interval with
third-order singlestep DPM-Solver and nine evaluations), once for every budget; :func:`rms` is
the error of a replay against it; :func:`sensitivities` measures how much of a perturbation at
each grid point reaches the final sample (the weights of the grid-point search).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pdm.calibration.search import stage
from pdm.sampling.sampler import sample
from pdm.schedule import VPSchedule


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


def reference_for(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    steps: int = 100,
    progress: bool = False,
    **sample_kwargs,
) -> Reference:
    """:class:`Reference` states of ``noise`` on the ``steps``-step grid ``sample_kwargs`` describe."""
    sample_kwargs = {"skip_type": "logSNR", **sample_kwargs}
    grid = schedule.timesteps(
        steps,
        sample_kwargs["skip_type"],
        sample_kwargs.get("t_start"),
        sample_kwargs.get("t_end"),
        dtype=noise.dtype,
        device=noise.device,
    )
    with torch.no_grad():
        states = reference_states(
            model_fn,
            noise,
            schedule,
            grid,
            sample_kwargs.get("prediction", "eps"),
            dict(sample_kwargs.get("model_kwargs") or {}),
            progress=progress,
        )
    return Reference(grid, states)


def rms(a: Tensor, b: Tensor, weights: Tensor | None = None) -> float:
    """RMS difference per pixel; with ``weights`` (one per image, summing to 1), the root of the
    weighted mean of the images' mean squares (:mod:`pdm.calibration.screening`)."""
    d = (a - b).double().pow(2)
    return float(
        d.mean().sqrt() if weights is None else (weights.to(d) * d.flatten(1).mean(1)).sum().sqrt()
    )


def reference_states(
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    schedule: VPSchedule,
    grid: Tensor,
    prediction: str,
    model_kwargs: dict[str, Tensor],
    substeps: int = 9,
    progress: bool = False,
) -> list[Tensor]:
    """x*(t_i) at every point of ``grid``: each interval solved accurately with third-order
    singlestep DPM-Solver (``substeps`` evaluations, logSNR inner grid) from the previous state."""
    states = [noise]
    for i in stage(range(grid.numel() - 1), grid.numel() - 1, "reference solution", progress):
        x = sample(
            model_fn,
            states[-1],
            schedule,
            steps=substeps,
            solver="dpmsolver",
            order=3,
            method="singlestep_fixed",
            skip_type="logSNR",
            t_start=float(grid[i]),
            t_end=float(grid[i + 1]),
            prediction=prediction,
            model_kwargs=model_kwargs,
        ).x
        states.append(x)
    return states


def sensitivities(
    model_fn: Callable[..., Tensor],
    states: list[Tensor],
    schedule: VPSchedule,
    grid: Tensor,
    prediction: str,
    model_kwargs: dict[str, Tensor],
    scale: float = 1e-3,
    steps: int = 12,
    progress: bool = False,
) -> list[float]:
    """How much of a small perturbation of x*(t_i) reaches the final sample, for each grid point:
    RMS(x_end(x* + delta) - x_end(x*)) / RMS(delta), both ends solved with UniPC-3 on logSNR."""
    g = torch.Generator(device=states[0].device).manual_seed(0)
    out = []
    for i in stage(range(grid.numel() - 1), grid.numel() - 1, "sensitivities", progress):
        delta = scale * torch.randn(
            states[i].shape, generator=g, dtype=states[i].dtype, device=states[i].device
        )
        kw = dict(
            steps=steps,
            solver="unipc",
            order=3,
            skip_type="logSNR",
            t_start=float(grid[i]),
            t_end=float(grid[-1]),
            prediction=prediction,
            model_kwargs=model_kwargs,
        )
        a = sample(model_fn, states[i], schedule, **kw).x
        b = sample(model_fn, states[i] + delta, schedule, **kw).x
        out.append(rms(a, b) / rms(delta, torch.zeros_like(delta)))
    return out + [1.0]
