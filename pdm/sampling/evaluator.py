"""Calling the model during sampling: only for the samples that need it, in the solver's form.

A solver consumes data predictions x0 (data form) or noise predictions eps (noise form);
the model returns eps, x0 or v. :class:`ModelEvaluator` converts each output at the point
(x_t, t) it belongs to, applies dynamic thresholding to x0, counts evaluations per sample,
and fills the samples a skip policy left out (see :mod:`pdm.sampling.skipping`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pdm.objectives import to_eps, to_x0
from pdm.sampling.guidance import dynamic_threshold
from pdm.sampling.skipping import OutputHistory
from pdm.sampling.solvers import TimePoint

ModelFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Thresholding:
    """Imagen's dynamic thresholding of x0: clamp at the ``ratio`` quantile of |x0| (at least
    ``max_value``) and rescale (Saharia et al. 2022)."""

    ratio: float = 0.995
    max_value: float = 1.0


class ModelEvaluator:
    """Evaluates ``model_fn`` on the rows a mask selects and returns every row's output.

    Args:
        model_fn: ``model_fn(x, t, **model_kwargs)`` returning ``prediction``.
        prediction: what the model returns, ``eps``, ``x0`` or ``v``.
        data: return data predictions (True) or noise predictions (False).
        model_kwargs: per-sample tensors sliced together with x.
        thresholding: dynamic thresholding of x0, or None.
        fill: how rows left out by a mask are filled: ``reuse`` the last raw output converted
            at the current point, ``forecast`` from the evaluated history, or None (no skipping).
        forecast_order: the highest order of the forecast.
    """

    def __init__(self, model_fn: ModelFn, prediction: str, data: bool, model_kwargs: dict[str, Tensor],
                 thresholding: Thresholding | None, batch: int, device: torch.device, fill: str | None = None,
                 forecast_order: int = 2) -> None:
        self.model_fn, self.prediction, self.data = model_fn, prediction, data
        self.model_kwargs, self.thresholding = model_kwargs, thresholding
        self.fill, self.forecast_order = fill, forecast_order
        self.history = OutputHistory(forecast_order + 1) if fill == "forecast" else None
        self.raw_cache: Tensor | None = None  # last raw output of every sample (reuse fill)
        self.nfe = torch.zeros(batch, dtype=torch.long, device=device)
        self.step_evaluated = torch.zeros(batch, dtype=torch.bool, device=device)

    def begin_step(self) -> None:
        """Start counting which samples call the network during the next solver step."""
        self.step_evaluated = torch.zeros_like(self.step_evaluated)

    def end_step(self) -> Tensor:
        """Which samples called the network since :meth:`begin_step`."""
        return self.step_evaluated.clone()

    def __call__(self, x: Tensor, point: TimePoint, mask: Tensor | None = None) -> Tensor:
        """The solver-form output of every sample at (x, point); rows outside ``mask`` are filled."""
        batch = x.shape[0]
        if mask is None or self.fill is None or bool(mask.all()):
            rows = torch.arange(batch, device=x.device)
        else:
            rows = torch.nonzero(mask).flatten()
        raw = self._call(x, point, rows)
        if self.fill == "reuse":
            self.raw_cache = raw if self.raw_cache is None or rows.numel() == batch else self._scatter(self.raw_cache, rows, raw)
            return self._convert(self.raw_cache, x, point)
        out = self._convert(raw, x[rows], point) if rows.numel() else x.new_zeros((0, *x.shape[1:]))
        if self.history is None:
            return out
        if self.history.values is None:
            self.history.start(x)
        if rows.numel():
            self.history.push(rows, out, point.lambda_)
        if rows.numel() == batch:
            return out
        skipped = torch.nonzero(~mask).flatten()
        full = x.new_empty(x.shape)
        full[rows] = out
        full[skipped] = self.history.forecast(point.lambda_, self.forecast_order, skipped).to(x.dtype)
        return full

    def _call(self, x: Tensor, point: TimePoint, rows: Tensor) -> Tensor:
        if rows.numel() == 0:
            return x.new_zeros((0, *x.shape[1:]))
        if rows.numel() == x.shape[0]:
            out = self.model_fn(x, point.t.expand(x.shape[0]).to(x.dtype), **self.model_kwargs)
        else:
            kwargs = {k: v[rows] for k, v in self.model_kwargs.items()}
            out = self.model_fn(x[rows], point.t.expand(rows.numel()).to(x.dtype), **kwargs)
        self.nfe[rows] += 1
        self.step_evaluated[rows] = True
        return out.to(x.dtype)

    @staticmethod
    def _scatter(base: Tensor, rows: Tensor, values: Tensor) -> Tensor:
        out = base.clone()
        out[rows] = values
        return out

    def _convert(self, raw: Tensor, x: Tensor, point: TimePoint, data: bool | None = None) -> Tensor:
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
        raw = self._call(x, point, torch.arange(x.shape[0], device=x.device))
        return self._convert(raw, x, point, data=True)
