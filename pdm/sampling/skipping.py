"""Step skipping: run the solver's full grid but call the network at only some of its points.

Two questions per step: *whether* to call the network (the criterion, or a fixed path) and,
if not, *what to use instead* (the fill).

Fill:
- ``reuse`` (AdaptiveDiffusion, Ye et al. 2024, arXiv 2410.09873): the last raw network output,
  converted at the current (x_t, t).
- ``forecast``: extrapolate the sample's recent *evaluated* outputs, in the form the solver
  consumes (x0 or eps), over lambda with the Lagrange polynomial of the order the history
  allows: the idea behind Adams-Bashforth caching, TaylorSeer and SADA. It is exact when the
  outputs are polynomials in lambda of that order.

Criteria:
- ``latent`` (the official AdaptiveDiffusion test): with d_k = mean |x_k - x_{k-1}| for the
  latents x_k after k steps, step k+1 may skip when |d_k - 2 d_{k-1} + d_{k-2}| <= 2 delta d_{k-1}.
  Batch-shared mode averages d_k over the batch and makes the official decisions.
- ``error`` (ours): estimate the skip's own error. The forecasts of orders p and p-1 of the
  coming output disagree by about the error of the lower one; through the next step that
  output enters x with weight |alpha_t (e^-h - 1)| (data form) or |sigma_t (e^h - 1)| (noise
  form). The skip is taken where that error, in DPM-Solver's mixed tolerance
  max(atol, rtol |x|) with (atol, rtol) = threshold * (0.0078, 0.05), has RMS at most 1.
Both criteria never skip during the warm-up and never more than ``max_skips`` steps in a row.

This module holds the settings (:class:`AdaptiveSkip`, :class:`FixedSkip`) and the criteria;
:mod:`pdm.sampling.skipper` runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

Fill = Literal["forecast", "reuse"]
FILLS: tuple[str, ...] = get_args(Fill)
TOLERANCE = (
    0.0078,
    0.05,
)  # DPM-Solver's adaptive (atol, rtol) for data in [-1, 1], scaled by the threshold


def _check_fill(fill: str, forecast_order: int) -> None:
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)}")
    if not 0 <= forecast_order <= 3:
        raise ValueError(f"forecast_order must be 0..3, got {forecast_order}")


class Criterion:
    """Decides, after a step, which samples may skip the coming evaluation (None: not yet known).

    A new criterion is a subclass with a ``may_skip`` and its name in :data:`CRITERION_CLASSES`;
    ``AdaptiveSkip(criterion=name)`` then runs it. ``skipper`` is the run's
    :class:`~pdm.sampling.skipper.Skipper` (its ``batch`` and forecast ``history``)."""

    def __init__(self, config: AdaptiveSkip) -> None:
        self.config = config

    def may_skip(
        self, x: Tensor, skipper, lam_next: Tensor | None, weight_next: Tensor | None
    ) -> Tensor | None:
        """(B,) bool: may each sample skip the evaluation at ``lam_next``, whose output enters the
        next update with ``weight_next``; None while the criterion cannot tell yet."""
        raise NotImplementedError


class LatentCriterion(Criterion):
    """AdaptiveDiffusion's test on the latents' third-order difference (see :mod:`~pdm.sampling.skipping`)."""

    def __init__(self, config: AdaptiveSkip) -> None:
        super().__init__(config)
        self.latents: list[Tensor] = []  # x_{k-1}, x_k for the latent differences
        self.diffs: list[Tensor] = []  # the last three d_k, each (B,)

    def may_skip(self, x, skipper, lam_next, weight_next):
        # d_k needs x_{k-1}; the initial noise x_0 is never used, so d_2 is the first difference
        self.latents = (self.latents + [x])[-2:]
        if len(self.latents) < 2:
            return None
        delta = (self.latents[1] - self.latents[0]).abs()
        d_k = (
            delta.flatten(1).mean(dim=1)
            if self.config.per_sample
            else delta.mean().expand(skipper.batch)
        )
        self.diffs = (self.diffs + [d_k.to(torch.float64)])[-3:]
        if len(self.diffs) < 3:
            return None
        d_k, d_km1, d_km2 = self.diffs[-1], self.diffs[-2], self.diffs[-3]
        return (d_k - 2.0 * d_km1 + d_km2).abs() <= 2.0 * self.config.threshold * d_km1


class ErrorCriterion(Criterion):
    """The skip's own estimated error: forecasts of orders p and p-1 disagree by about the
    lower one's error, weighted as the coming output enters the next update."""

    def may_skip(self, x, skipper, lam_next, weight_next):
        hist = skipper.history
        if lam_next is None or hist is None or hist.count is None or bool((hist.count < 2).any()):
            return None
        cfg = self.config
        rows = torch.arange(skipper.batch, device=x.device)
        high = hist.forecast(lam_next, cfg.forecast_order, rows)
        low = hist.forecast(lam_next, cfg.forecast_order - 1, rows)
        atol, rtol = (cfg.threshold * c for c in TOLERANCE)
        tol = torch.clamp(rtol * x.abs(), min=atol)
        rms = ((weight_next.abs() * (high - low)) / tol).flatten(1).pow(2).mean(dim=1).sqrt()
        if not cfg.per_sample:
            rms = rms.max().expand(skipper.batch)
        return rms <= 1.0


CRITERION_CLASSES: dict[str, type[Criterion]] = {"latent": LatentCriterion, "error": ErrorCriterion}


@dataclass(frozen=True)
class AdaptiveSkip:
    """Adaptive step skipping; the defaults are the best configuration benchmarks/skip_tradeoff.py
    found (which does not beat a plain solver at equal NFE: see the README's "When to skip").

    Args:
        threshold: how much error a skip may cost: 0 never skips, larger skips more. For the
            ``error`` criterion it scales DPM-Solver's tolerances (default 0.5, the median of
            the thresholds chosen on calibration seeds over every budget and model); for
            ``latent`` it is the official delta (0.01 for SD-1.5 / SDXL).
        max_skips: C_max, the most consecutive skips before the network must run again.
        warmup: the first ``warmup`` steps always call the network (at least 4: the latent
            test needs three differences of latents that come after the initial noise).
        per_sample: decide per sample (True) or once for the whole batch (official).
        criterion: ``error`` (the skip's estimated error) or ``latent`` (the official test).
        fill: ``forecast`` (extrapolate recent outputs over lambda) or ``reuse`` (official).
        forecast_order: the highest polynomial order of the forecast (lower while history is short).
    """

    threshold: float = 0.5
    max_skips: int = 2
    warmup: int = 4
    per_sample: bool = True
    criterion: str = "error"
    fill: Fill = "forecast"
    forecast_order: int = 2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"skip threshold must be a finite number >= 0, got {self.threshold}")
        if self.max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {self.max_skips}")
        if self.warmup < 4:
            raise ValueError(
                f"skip warmup must be at least 4 steps (the criteria need three steps after the initial "
                f"noise), got {self.warmup}"
            )
        if self.criterion not in CRITERION_CLASSES:
            raise ValueError(
                f"unknown skip criterion {self.criterion!r}; choose one of {', '.join(CRITERION_CLASSES)}"
            )
        _check_fill(self.fill, self.forecast_order)
        if self.criterion == "error" and not 1 <= self.forecast_order < self.warmup:
            raise ValueError(
                f"the error criterion compares forecasts of orders p and p-1: forecast_order must be "
                f"1..{self.warmup - 1}, got {self.forecast_order}"
            )

    @classmethod
    def official(
        cls, threshold: float = 0.01, max_skips: int = 4, warmup: int = 4, per_sample: bool = True
    ) -> AdaptiveSkip:
        """AdaptiveDiffusion as published: the latent criterion and reuse of the last output.
        With ``per_sample=False`` it makes the official (batch-shared) decisions exactly."""
        return cls(
            threshold,
            max_skips,
            warmup,
            per_sample,
            criterion="latent",
            fill="reuse",
            forecast_order=0,
        )


@dataclass(frozen=True)
class FixedSkip:
    """Step skipping by a fixed pattern: ``evaluate[i]`` says whether step i + 1 calls the network;
    the other steps are filled (``reuse`` or ``forecast``) as adaptive skipping fills them. The
    yardstick of AdaptiveDiffusion (:func:`pdm.calibration.greedy_skip_path`) is such a pattern.
    (A learned time schedule is not a skip pattern: :class:`pdm.sampling.LearnedSchedule`.)"""

    evaluate: tuple[bool, ...]
    fill: Fill = "reuse"
    forecast_order: int = 2

    def __post_init__(self) -> None:
        if not self.evaluate or not self.evaluate[0]:
            raise ValueError(
                "a skip pattern must evaluate the first step (there is no earlier output to reuse)"
            )
        object.__setattr__(self, "evaluate", tuple(bool(e) for e in self.evaluate))
        _check_fill(self.fill, self.forecast_order)

    @property
    def nfe(self) -> int:
        """Network evaluations of one run (not counting ``denoise_to_zero``)."""
        return sum(self.evaluate)
