"""Test and benchmark fixtures: an exact diffusion model no one trained.

A Gaussian mixture and its closed-form noise predictor.

If x0 ~ sum_k w_k N(mu_k, s_k^2 I), then x_t = alpha x0 + sigma eps is distributed as
sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), whose score is known exactly; the
optimal noise prediction is eps*(x, t) = -sigma * grad log p_t(x). Solvers can then be
checked for convergence order and skipping for its error without any trained network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pdm.objectives import convert
from pdm.schedule import VPSchedule


class GaussianMixture:
    """A mixture of isotropic Gaussians in ``means.shape[1:]`` dimensions with an exact eps model."""

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None) -> None:
        self.means = means.to(torch.float64)  # (K, *shape)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).flatten()  # (K,)
        k = self.means.shape[0]
        if self.stds.numel() == 1:
            self.stds = self.stds.expand(k).clone()
        w = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        self.log_weights = torch.log(w / w.sum())

    @classmethod
    def random(
        cls,
        components: int = 4,
        shape: tuple[int, ...] = (3, 4, 4),
        std: float = 0.3,
        seed: int = 0,
    ) -> GaussianMixture:
        """A reproducible mixture with means drawn in [-0.7, 0.7] (data-like, inside [-1, 1])."""
        g = torch.Generator().manual_seed(seed)
        means = torch.rand((components, *shape), generator=g, dtype=torch.float64) * 1.4 - 0.7
        stds = std * (0.75 + 0.5 * torch.rand(components, generator=g, dtype=torch.float64))
        return cls(means, stds)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw n clean samples x0."""
        idx = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return self.means[idx] + self.stds[idx].reshape(-1, *([1] * (self.means.ndim - 1))) * noise

    def eps(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The exact noise prediction at x for the given alpha, sigma (broadcast over the batch)."""
        dtype = x.dtype
        x = x.to(torch.float64)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)  # (B or 1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        flat = x.flatten(1)  # (B, D)
        mu = self.means.flatten(1)  # (K, D)
        var = a**2 * self.stds[None, :] ** 2 + s**2  # (B, K)
        diff = flat[:, None, :] - a[:, :, None] * mu[None]  # (B, K, D)
        d = flat.shape[1]
        log_p = self.log_weights[None] - 0.5 * (diff**2).sum(-1) / var - 0.5 * d * torch.log(var)
        resp = torch.softmax(log_p, dim=1)  # (B, K)
        score = -(resp[:, :, None] * diff / var[:, :, None]).sum(1)  # (B, D)
        return (-s * score).reshape(x.shape).to(dtype)

    def model_fn(self, schedule: VPSchedule, prediction: str = "eps") -> Callable[..., Tensor]:
        """A ``model_fn(x, t)`` for :func:`pdm.sampling.sample` predicting eps, x0 or v exactly."""

        def fn(x: Tensor, t: Tensor, **_: Tensor) -> Tensor:
            alpha, sigma = schedule.alpha(t.to(torch.float64)), schedule.sigma(t.to(torch.float64))
            e = self.eps(x, alpha, sigma)
            if prediction == "eps":
                return e
            return convert(e, x.to(torch.float64), alpha, sigma, "eps", prediction).to(x.dtype)

        return fn
