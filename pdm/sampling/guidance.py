"""Wrappers around a model function: classifier-free guidance, dynamic thresholding, experts.

Every wrapper returns another ``model_fn(x, t, **model_kwargs)``, so each solver works with
each of them (the k-diffusion lesson).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pdm.schedule import VPSchedule

ModelFn = Callable[..., Tensor]


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding: s = max(quantile_ratio(|x0|), max_value); clamp to [-s, s] and divide by s."""
    s = torch.quantile(
        x0.abs().flatten(1).to(torch.float32 if x0.dtype == torch.float16 else x0.dtype),
        ratio,
        dim=1,
    )
    s = torch.clamp(s, min=max_value).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def classifier_free_guidance(model_fn: ModelFn, scale: float, null_label: int) -> ModelFn:
    """Guide ``model_fn(x, t, y=...)``: out = uncond + scale * (cond - uncond).

    The conditional and null-label halves go through the network in one batched call. The
    combination is linear, so it holds for eps, x0 or v outputs alike.
    """

    def guided(x: Tensor, t: Tensor, y: Tensor | None = None, **kwargs: Tensor) -> Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        if scale == 1.0:
            return model_fn(x, t, y=y, **kwargs)
        null = torch.full_like(y, null_label)
        both = model_fn(
            torch.cat([x, x]),
            torch.cat([t, t]),
            y=torch.cat([y, null]),
            **{k: torch.cat([v, v]) for k, v in kwargs.items()},
        )
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return guided


def expert_router(
    high_noise: ModelFn,
    low_noise: ModelFn,
    schedule: VPSchedule,
    snr_split: float = 0.25,
    split_label: int | None = None,
) -> ModelFn:
    """Send each sample to the expert owning its time: SNR < snr_split -> the high-noise expert.

    With the linear schedule and snr_split = 0.25 the high-noise expert owns the discrete steps
    396..999 and the low-noise expert 0..395 (PDM's ImageNet-256 split). ``split_label`` (the
    first step of the high-noise expert) overrides the SNR rule.
    """
    split_label = float(
        schedule.index_where_snr_below(snr_split) if split_label is None else split_label
    )

    def routed(x: Tensor, t: Tensor, **kwargs: Tensor) -> Tensor:
        # Route on the label rounded as the network sees it, so the split is exactly at 396.
        high = schedule.label(t) >= split_label - 0.5
        if bool(high.all()):
            return high_noise(x, t, **kwargs)
        if not bool(high.any()):
            return low_noise(x, t, **kwargs)
        out = None
        for mask, fn in ((high, high_noise), (~high, low_noise)):
            part = fn(x[mask], t[mask], **{k: v[mask] for k, v in kwargs.items()})
            if out is None:
                out = part.new_empty((x.shape[0],) + part.shape[1:])
            out[mask] = part
        return out

    return routed
