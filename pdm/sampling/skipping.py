"""Adaptive step skipping (AdaptiveDiffusion, Ye et al. 2024, arXiv 2410.09873).

After each solver step k the sampler hands the new latents x_k to the controller. With
d_k = mean |x_k - x_{k-1}|, the third-order difference of the latents,
|d_k - 2 d_{k-1} + d_{k-2}|, measures how fast the trajectory bends. If it is at most
2 * threshold * d_{k-1}, step k+1 may reuse the last network output instead of calling
the network. Steps 1..warmup always evaluate, and after ``max_skips`` consecutive skips the
next step evaluates.

Per-sample mode (the default) applies the test to each sample's own latents, so a sample's
path does not depend on its batch; batch-shared mode averages d_k over the whole batch and
reproduces the official decisions exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AdaptiveSkip:
    """Settings of adaptive step skipping.

    Args:
        threshold: delta of the criterion; 0 never skips. 0.01 for SD-style models.
        max_skips: C_max, the most consecutive skips before the network must run again.
        warmup: the first ``warmup`` steps always call the network (at least 3).
        per_sample: decide per sample (True) or once for the whole batch (official).
    """

    threshold: float = 0.01
    max_skips: int = 4
    warmup: int = 4
    per_sample: bool = True

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"skip threshold must be >= 0, got {self.threshold}")
        if self.max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {self.max_skips}")
        if self.warmup < 3:
            raise ValueError(f"skip warmup must be at least 3 steps (the test needs three differences), got {self.warmup}")


@dataclass(frozen=True)
class SkipPath:
    """A fixed skip path: ``evaluate[i]`` says whether step i + 1 calls the network.

    Used to replay a path found offline (e.g. the greedy optimal path of
    :func:`pdm.sampling.greedy.greedy_skip_path`); the same path applies to every sample.
    """

    evaluate: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not self.evaluate or not self.evaluate[0]:
            raise ValueError("a skip path must evaluate the first step (there is no earlier output to reuse)")


class SkipController:
    """The state of one sampling run: latents seen so far and the skip streak of each sample."""

    def __init__(self, config: AdaptiveSkip | SkipPath | None, batch: int, device: torch.device) -> None:
        self.config = config
        self.batch = batch
        self.device = device
        self.prev: Tensor | None = None  # x_{k-1}
        self.diffs: list[Tensor] = []  # d_1..d_k, each (B,)
        self.streak = torch.zeros(batch, dtype=torch.long, device=device)
        self.next_mask = torch.ones(batch, dtype=torch.bool, device=device)
        self.steps_seen = 0

    def start(self, x0: Tensor) -> None:
        """Record the initial noise x_0 (only its difference to x_1 is ever used)."""
        self.prev = x0

    def mask(self) -> Tensor:
        """Which samples must call the network for the coming step."""
        return self.next_mask

    def observe(self, x: Tensor, evaluated: Tensor) -> None:
        """Take the latents after a step and decide which samples evaluate the next one."""
        self.steps_seen += 1
        cfg = self.config
        self.streak = torch.where(evaluated, torch.zeros_like(self.streak), self.streak + 1)
        if isinstance(cfg, SkipPath):
            k = self.steps_seen
            flag = cfg.evaluate[k] if k < len(cfg.evaluate) else True
            self.next_mask = torch.full((self.batch,), bool(flag), dtype=torch.bool, device=self.device)
            return
        if cfg is None or cfg.threshold == 0:
            self.prev = x
            return
        if cfg.per_sample:
            diff = (x - self.prev).abs().flatten(1).mean(dim=1).to(torch.float64)
        else:
            diff = (x - self.prev).abs().mean().to(torch.float64).expand(self.batch)
        self.diffs.append(diff)
        self.prev = x
        self.diffs = self.diffs[-3:]
        if self.steps_seen < cfg.warmup:
            self.next_mask = torch.ones(self.batch, dtype=torch.bool, device=self.device)
            return
        d_k, d_km1, d_km2 = self.diffs[-1], self.diffs[-2], self.diffs[-3]
        smooth = (d_k - 2.0 * d_km1 + d_km2).abs() <= 2.0 * cfg.threshold * d_km1
        may_skip = smooth & (self.streak < cfg.max_skips)
        self.next_mask = ~may_skip
