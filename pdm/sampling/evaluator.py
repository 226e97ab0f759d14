"""Calling the model during sampling: only for the samples that need it, in the solver's form.

A solver consumes data predictions x0 (data form) or noise predictions eps (noise form);
the model returns eps, x0 or v. :class:`ModelEvaluator` converts each output at the point
(x_t, t) it belongs to, applies dynamic thresholding to x0 and counts evaluations per sample;
which samples are evaluated is decided by :mod:`pdm.sampling.skipper`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pdm.objectives import to_eps, to_x0
from pdm.sampling.guidance import dynamic_threshold
from pdm.sampling.solvers import TimePoint

ModelFn = Callable[..., Tensor]


class CountingModel:
    """A ``model_fn`` that records how many calls it got and how many images (rows) they held:
    what a calibration or a test spends, whoever calls the model (with guidance each image counts
    once, though the guided network runs twice)."""

    def __init__(self, fn: ModelFn) -> None:
        self.fn, self.rows, self.calls = fn, 0, 0

    def __call__(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        self.rows += x.shape[0]
        self.calls += 1
        return self.fn(x, t, **kwargs)


def input_digest(named: Iterable[tuple[str, Any]]) -> bytes:
    """BLAKE2 digest of named inputs: each tensor's dtype, shape, device and bytes (others by repr),
    so two calls get the same digest exactly when their inputs are the same bit for bit."""
    h = hashlib.blake2b(digest_size=20)
    for name, value in named:
        h.update(name.encode())
        if isinstance(value, Tensor):
            h.update(f"{value.dtype}{tuple(value.shape)}{value.device}".encode())
            flat = value.detach().cpu().reshape(-1)
            dense = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)  # an expanded t has stride 0
            h.update(dense.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.digest()


class RecallingModel:
    """A ``model_fn`` that remembers its outputs for the last inputs it saw and answers a repeated
    call (the same x, t and model arguments, bit for bit) from memory instead of the network.

    A calibration scores many candidate paths that differ from the current best in one time or
    one coefficient: until that step every candidate's trajectory is the current one's, bit for
    bit, so its network calls there are repeats. Answered from memory they cost nothing, and the
    result is exactly the one without memory (on CPU the network is deterministic on the same input;
    with non-deterministic GPU kernels the remembered output is one the network gave for it).
    Inputs are recognised by a BLAKE2 digest of their bytes; the oldest entries are forgotten
    beyond ``max_bytes`` of remembered outputs. ``hits`` counts the calls answered from memory."""

    def __init__(self, fn: ModelFn, max_bytes: int = 1 << 30) -> None:
        self.fn, self.max_bytes, self.hits, self.held = fn, max_bytes, 0, 0
        self.memory: OrderedDict[bytes, Tensor] = OrderedDict()

    @staticmethod
    def _key(x: Tensor, t: Tensor, kwargs: dict) -> bytes:
        return input_digest((("x", x), ("t", t), *sorted(kwargs.items())))

    def __call__(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        key = self._key(x, t, kwargs)
        if key in self.memory:
            self.hits += 1
            self.memory.move_to_end(key)
            return self.memory[key].clone()
        out = self.fn(x, t, **kwargs)
        size = out.numel() * out.element_size()
        if size <= self.max_bytes:
            self.memory[key], self.held = out.detach().clone(), self.held + size
            while self.held > self.max_bytes:
                _, old = self.memory.popitem(last=False)
                self.held -= old.numel() * old.element_size()
        return out


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

    def __init__(self, model_fn: ModelFn, prediction: str, data: bool, model_kwargs: dict[str, Tensor],
                 thresholding: Thresholding | None, batch: int, device: torch.device) -> None:
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
