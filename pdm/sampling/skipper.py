"""The skipping of one sampling run, in one owner: :class:`Skipper` decides which samples call the
network at the coming evaluation (a fixed path, or a criterion), has only those evaluated, fills
the others (``reuse`` or ``forecast``) and keeps the history both need. The settings it runs
(:class:`~pdm.sampling.skipping.AdaptiveSkip`, :class:`~pdm.sampling.skipping.FixedSkip`) and what
the fills and criteria mean are described in :mod:`pdm.sampling.skipping`.

A criterion is one small class (:class:`~pdm.sampling.skipping.Criterion`): ``may_skip`` says,
after a step, which samples could skip the next evaluation; the skipper adds the warm-up and the
``max_skips`` limit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pdm.sampling.points import TimePoint
from pdm.sampling.skipping import CRITERION_CLASSES, AdaptiveSkip, FixedSkip

RawCall = Callable[
    [Tensor, TimePoint, Tensor], Tensor
]  # (x, point, rows) -> the model's raw output of rows
Convert = Callable[[Tensor, Tensor, TimePoint], Tensor]  # (raw, x, point) -> solver-form output


def lagrange_extrapolate(lams: Tensor, values: Tensor, lam: Tensor) -> Tensor:
    """Evaluate at ``lam`` the polynomial through (lams[j], values[j]) for each sample.

    lams: (n, B) nodes; values: (n, B, ...) outputs; lam: scalar or (B,). Returns (B, ...).
    """
    n = lams.shape[0]
    lam = torch.as_tensor(lam, dtype=lams.dtype, device=lams.device).expand(lams.shape[1])
    out = torch.zeros_like(values[0])
    for j in range(n):
        w = torch.ones_like(lam)
        for m in range(n):
            if m != j:
                w = w * (lam - lams[m]) / (lams[j] - lams[m])
        out = out + w.reshape(-1, *([1] * (values.ndim - 2))).to(values.dtype) * values[j]
    return out


class OutputHistory:
    """The last ``size`` evaluated outputs of every sample, with the lambda each was taken at."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: Tensor | None = None  # (size, B, ...), newest last
        self.lams: Tensor | None = None  # (size, B)
        self.count: Tensor | None = None  # (B,) evaluated outputs seen so far

    def push(self, rows: Tensor, values: Tensor, lam: Tensor) -> None:
        """Record the evaluated outputs ``values`` (len(rows), ...) of the samples ``rows`` at ``lam``."""
        if self.values is None:
            raise RuntimeError("call start(batch_like) before push")
        self.values[:, rows] = torch.cat([self.values[1:, rows], values[None]])
        self.lams[:, rows] = torch.cat(
            [self.lams[1:, rows], lam.to(self.lams.dtype).expand(1, rows.numel())]
        )
        self.count[rows] += 1

    def start(self, like: Tensor) -> None:
        """Allocate storage for a batch shaped like ``like``."""
        self.values = like.new_zeros((self.size, *like.shape))
        self.lams = torch.zeros(self.size, like.shape[0], dtype=torch.float64, device=like.device)
        self.count = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)

    def forecast(self, lam: Tensor, order: int, rows: Tensor) -> Tensor:
        """Extrapolate each of ``rows`` to ``lam`` with order min(order, its evaluated outputs - 1)."""
        out = self.values[-1, rows].clone()
        eff = (self.count[rows] - 1).clamp(max=order, min=0)
        for p in range(1, order + 1):
            sel = torch.nonzero(eff == p).flatten()
            if sel.numel():
                r = rows[sel]
                out[sel] = lagrange_extrapolate(
                    self.lams[-p - 1 :, r], self.values[-p - 1 :, r], lam
                )
        return out


class Skipper:
    """One run's skipping: which samples evaluate next, the evaluation of only those, the fill.

    Args:
        config: :class:`AdaptiveSkip`, a :class:`FixedSkip` pattern, or None (never skip).
        batch, device: the run's batch.
        convert: ``convert(raw, x, point)``, the model's raw output as the solver consumes it.
    """

    def __init__(
        self,
        config: AdaptiveSkip | FixedSkip | None,
        batch: int,
        device: torch.device,
        convert: Convert,
    ) -> None:
        self.config, self.batch, self.device, self.convert = config, batch, device, convert
        self.fill = None if config is None else config.fill
        order = 0 if config is None else config.forecast_order
        self.history = OutputHistory(order + 1) if self.fill == "forecast" else None
        self.raw_cache: Tensor | None = None  # last raw output of every sample (reuse fill)
        self.criterion = (
            CRITERION_CLASSES[config.criterion](config)
            if isinstance(config, AdaptiveSkip)
            else None
        )
        self.streak = torch.zeros(batch, dtype=torch.long, device=device)
        self.next_mask: Tensor | None = None  # None: every sample evaluates
        self.steps_seen = 0

    def evaluate(self, call: RawCall, x: Tensor, point: TimePoint) -> tuple[Tensor, Tensor]:
        """(every sample's solver-form output at (x, point), which samples ran the network)."""
        mask = self.next_mask
        everyone = mask is None or self.fill is None or bool(mask.all())
        rows = (
            torch.arange(self.batch, device=x.device) if everyone else torch.nonzero(mask).flatten()
        )
        if everyone:
            evaluated = torch.ones(self.batch, dtype=torch.bool, device=x.device)
        else:
            evaluated = mask.clone()
        raw = call(x, point, rows)
        if self.fill == "reuse":
            self.raw_cache = (
                raw
                if self.raw_cache is None or everyone
                else self._scatter(self.raw_cache, rows, raw)
            )
            return self.convert(self.raw_cache, x, point), evaluated
        if everyone:  # no gather: x[arange] would copy the whole batch at every evaluation
            out = self.convert(raw, x, point)
        else:
            out = (
                self.convert(raw, x[rows], point)
                if rows.numel()
                else x.new_zeros((0, *x.shape[1:]))
            )
        if self.history is None:
            return out, evaluated
        if self.history.values is None:
            self.history.start(x)
        if rows.numel():
            self.history.push(rows, out, point.lambda_)
        if everyone:
            return out, evaluated
        full = x.new_empty(x.shape)
        full[rows] = out
        skipped = torch.nonzero(~evaluated).flatten()
        full[skipped] = self.history.forecast(
            point.lambda_, self.config.forecast_order, skipped
        ).to(x.dtype)
        return full, evaluated

    @staticmethod
    def _scatter(base: Tensor, rows: Tensor, values: Tensor) -> Tensor:
        out = base.clone()
        out[rows] = values
        return out

    def observe(
        self,
        x: Tensor,
        evaluated: Tensor,
        lam_next: Tensor | None = None,
        weight_next: Tensor | None = None,
    ) -> None:
        """Take the latents after a step and decide which samples evaluate the next one.

        ``lam_next`` is the lambda of the coming evaluation and ``weight_next`` the weight its
        output gets in the next update (both used by the error criterion).
        """
        self.steps_seen += 1
        cfg = self.config
        self.streak = torch.where(evaluated, torch.zeros_like(self.streak), self.streak + 1)
        if isinstance(cfg, FixedSkip):
            k = self.steps_seen
            flag = cfg.evaluate[k] if k < len(cfg.evaluate) else True
            self.next_mask = torch.full(
                (self.batch,), bool(flag), dtype=torch.bool, device=self.device
            )
            return
        if self.criterion is None or cfg.threshold == 0:
            return
        may_skip = self.criterion.may_skip(x, self, lam_next, weight_next)
        if may_skip is None or self.steps_seen < cfg.warmup:
            self.next_mask = None
            return
        self.next_mask = ~(may_skip & (self.streak < cfg.max_skips))
