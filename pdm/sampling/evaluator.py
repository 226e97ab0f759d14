"""Calling the model during sampling: only for the samples that need it, in the solver's form.

A solver consumes data predictions x0 (data form) or noise predictions eps (noise form);
the model returns eps, x0 or v. :class:`ModelEvaluator` converts each output at the point
(x_t, t) it belongs to, applies dynamic thresholding to x0 and counts evaluations per sample;
which samples are evaluated is decided by :mod:`pdm.sampling.skipper`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pdm.objectives import to_eps, to_x0
from pdm.sampling.guidance import dynamic_threshold
from pdm.sampling.points import TimePoint

ModelFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Thresholding:
    """Imagen's dynamic thresholding of x0: clamp at the ``ratio`` quantile of |x0| (at least
    ``max_value``) and rescale (Saharia et al. 2022)."""

    ratio: float = 0.995
    max_value: float = 1.0


class ModelEvaluator:
    """Calls ``model_fn`` on the rows asked for, counts evaluations per sample, and converts raw
    outputs to the solver's form. Which rows run, and what the others get, is the
    :class:`~pdm.sampling.skipper.Skipper`'s business: the evaluator keeps no per-step state.

    Args:
        model_fn: ``model_fn(x, t, **model_kwargs)`` returning ``prediction``.
        prediction: what the model returns, ``eps``, ``x0`` or ``v``.
        data: convert to data predictions (True) or noise predictions (False).
        model_kwargs: per-sample tensors sliced together with x.
        thresholding: dynamic thresholding of x0, or None.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        prediction: str,
        data: bool,
        model_kwargs: dict[str, Tensor],
        thresholding: Thresholding | None,
        batch: int,
        device: torch.device,
    ) -> None:
        self.model_fn, self.prediction, self.data = model_fn, prediction, data
        self.model_kwargs, self.thresholding = model_kwargs, thresholding
        self.nfe = torch.zeros(batch, dtype=torch.long, device=device)

    def __call__(self, x: Tensor, point: TimePoint) -> Tensor:
        """Every sample's solver-form output at (x, point) (no skipping: the adaptive method)."""
        return self.convert(self.raw(x, point, torch.arange(x.shape[0], device=x.device)), x, point)

    def raw(self, x: Tensor, point: TimePoint, rows: Tensor) -> Tensor:
        """The model's raw output for the samples ``rows`` of x at ``point`` (counted in ``nfe``)."""
        if rows.numel() == 0:
            return x.new_zeros((0, *x.shape[1:]))
        if rows.numel() == x.shape[0]:
            out = self.model_fn(x, point.t.expand(x.shape[0]).to(x.dtype), **self.model_kwargs)
        else:
            kwargs = {k: v[rows] for k, v in self.model_kwargs.items()}
            out = self.model_fn(x[rows], point.t.expand(rows.numel()).to(x.dtype), **kwargs)
        self.nfe[rows] += 1
        return out.to(x.dtype)

    def convert(self, raw: Tensor, x: Tensor, point: TimePoint, data: bool | None = None) -> Tensor:
        """``raw`` (the model's ``prediction``) at (x, point) in the data (x0) or noise (eps) form,
        x0 dynamically thresholded when asked. ``data`` defaults to the solver's form."""
        data = self.data if data is None else data
        if self.thresholding is None:
            return (to_x0 if data else to_eps)(raw, x, point.alpha, point.sigma, self.prediction)
        x0 = to_x0(raw, x, point.alpha, point.sigma, self.prediction)
        x0 = dynamic_threshold(x0, self.thresholding.ratio, self.thresholding.max_value)
        return x0 if data else to_eps(x0, x, point.alpha, point.sigma, "x0")

    def data_prediction(self, x: Tensor, point: TimePoint) -> Tensor:
        """x0 at (x, point) for every sample, always evaluated (the final ``denoise_to_zero``)."""
        raw = self.raw(x, point, torch.arange(x.shape[0], device=x.device))
        return self.convert(raw, x, point, data=True)
