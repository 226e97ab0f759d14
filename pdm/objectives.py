"""Prediction targets (eps, x0, v), exact conversions among them, and loss weightings.

With x_t = alpha x0 + sigma eps (alpha^2 + sigma^2 = 1):
    x0 = (x_t - sigma eps) / alpha,  eps = (x_t - alpha x0) / sigma,
    v  = alpha eps - sigma x0        (Salimans & Ho 2022),
    x0 = alpha x_t - sigma v,        eps = sigma x_t + alpha v.

A weighting is a function w(SNR) applied to the x0-space squared error, whatever the network
predicts: since x0_err = -(sigma/alpha) eps_err, an eps-MSE is x0-MSE * SNR and a v-MSE is
x0-MSE * (SNR + 1). So every objective of the literature is one weight on one error.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Target = Literal["eps", "x0", "v"]
TARGETS: tuple[str, ...] = ("eps", "x0", "v")
WEIGHTINGS: tuple[str, ...] = (
    "sqrt_snr",
    "snr",
    "snr_plus_one",
    "truncated_snr",
    "min_snr",
    "p2",
    "constant",
)


def _bcast(coef: Tensor, like: Tensor) -> Tensor:
    coef = torch.as_tensor(coef, dtype=like.dtype, device=like.device)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def check_target(target: str) -> str:
    """Return ``target`` if it names a prediction target, else raise a ValueError naming the choices."""
    if target not in TARGETS:
        raise ValueError(
            f"unknown prediction target {target!r}; choose one of {', '.join(TARGETS)}"
        )
    return target


def target_from(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """The regression target named ``target`` for a clean image ``x0`` and its noise ``eps``."""
    check_target(target)
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    return _bcast(alpha, x0) * eps - _bcast(sigma, x0) * x0


def to_x0(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """Convert a network output of kind ``target`` at (x_t, alpha, sigma) to a data prediction."""
    check_target(target)
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if target == "x0":
        return pred
    if target == "eps":
        return (x_t - s * pred) / a
    return a * x_t - s * pred


def to_eps(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """Convert a network output of kind ``target`` at (x_t, alpha, sigma) to a noise prediction."""
    check_target(target)
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if target == "eps":
        return pred
    if target == "x0":
        return (x_t - a * pred) / s
    return s * x_t + a * pred


def to_v(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """Convert a network output of kind ``target`` at (x_t, alpha, sigma) to a v prediction."""
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    x0 = to_x0(pred, x_t, alpha, sigma, target)
    eps = to_eps(pred, x_t, alpha, sigma, target)
    return a * eps - s * x0


def convert(
    pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, source: str, target: str
) -> Tensor:
    """Convert a prediction of kind ``source`` to kind ``target`` (exact, no approximation)."""
    check_target(target)
    fn = {"x0": to_x0, "eps": to_eps, "v": to_v}[target]
    return fn(pred, x_t, alpha, sigma, source)


def loss_weight(
    snr: Tensor,
    weighting: str = "sqrt_snr",
    gamma: float = 5.0,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
) -> Tensor:
    """The weight w(SNR) on the x0-space squared error.

    - ``sqrt_snr``: sqrt(SNR), PDM's default (Luhman & Luhman 2022).
    - ``snr``: SNR, i.e. the eps-MSE of DDPM's simple loss.
    - ``snr_plus_one``: SNR + 1, i.e. the v-MSE.
    - ``truncated_snr``: max(SNR, 1) (Salimans & Ho 2022).
    - ``min_snr``: min(SNR, gamma), min-SNR-gamma (Hang et al. 2023; gamma = 5).
    - ``p2``: SNR / (k + SNR)^gamma, the P2 weighting of the eps loss (Choi et al. 2022).
    - ``constant``: 1, the plain x0-MSE.
    """
    if weighting == "sqrt_snr":
        return snr.sqrt()
    if weighting == "snr":
        return snr
    if weighting == "snr_plus_one":
        return snr + 1
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    if weighting == "min_snr":
        return snr.clamp(max=gamma)
    if weighting == "p2":
        return snr / (p2_k + snr) ** p2_gamma
    if weighting == "constant":
        return torch.ones_like(snr)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def x0_error_scale(alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """The factor c with |x0_pred - x0|^2 = c * |pred - target|^2 for a network predicting ``target``.

    c = 1 for x0, sigma^2 / alpha^2 = 1/SNR for eps, sigma^2 = 1/(SNR + 1) for v.
    """
    check_target(target)
    if target == "x0":
        return torch.ones_like(alpha)
    if target == "eps":
        return (sigma / alpha) ** 2
    return sigma**2


def weighted_x0_loss(
    pred: Tensor,
    x0: Tensor,
    eps: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    target: str = "x0",
    weighting: str = "sqrt_snr",
    **weight_kwargs: float,
) -> Tensor:
    """Per-sample loss w(SNR) * mean((x0_pred - x0)^2) for a network predicting ``target``.

    Returns a (B,) tensor. The error is taken in the target's own space and rescaled to x0
    space by :func:`x0_error_scale`, which is exact and avoids dividing by a tiny alpha.
    So target='eps' with weighting='snr' is the per-sample eps-MSE.
    """
    err = (pred - target_from(x0, eps, alpha, sigma, target)).pow(2).flatten(1).mean(dim=1)
    alpha = torch.as_tensor(alpha, dtype=err.dtype, device=err.device)
    sigma = torch.as_tensor(sigma, dtype=err.dtype, device=err.device)
    snr = (alpha / sigma) ** 2
    return loss_weight(snr, weighting, **weight_kwargs) * x0_error_scale(alpha, sigma, target) * err
