"""Analytical teleportation: the high-noise part of the ODE solved in closed form for a Gaussian
model of the data, so that every network evaluation is spent below a time t_s.

Wang & Vastola (2023), "The Hidden Linear Structure in Score-Based Models and its Application"
(arXiv:2311.10892): at high noise a trained denoiser is close to the optimal denoiser of the
Gaussian with the data's mean and covariance. For that Gaussian the probability-flow ODE is
linear, and along each principal direction (variance v) its solution is a rescaling:
x_t - alpha_t mu = sqrt(alpha_t^2 v + sigma_t^2) / sqrt(alpha_s^2 v + sigma_s^2) (x_s - alpha_s mu).
Starting a sampler at t_s from that solution costs no network evaluation. What is learned is
only the Gaussian (the data's moments, per class and for the whole data set,
:func:`pdm.calibration.teleport.fit_gaussian`); the teleport time t_s is chosen by the
calibration on its images like every other time of a schedule. This module replays it.

With classifier-free guidance the guided denoiser is the same combination of the class and the
whole-data Gaussian denoisers (affine in x, the two covariances need not commute), so the linear
ODE is integrated numerically instead (classical Runge-Kutta in the half log-SNR; no network).

Storage: per row (each class, then the whole data set) the mean, the ``rank`` principal
directions with their variances, and the mean variance of the remaining directions (treated as
isotropic). The moments are those of the data in the model's input space ([-1, 1] images).
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pdm.schedule import VPSchedule

GAUSSIAN_FORMAT = "pdm-gaussian-v1"


@dataclass(frozen=True)
class GaussianData:
    """Low-rank Gaussian moments of the data: row c < num_classes is class c, the last row the
    whole data set (an unconditional model has that row only)."""

    means: Tensor  # (R, D) float64
    basis: Tensor  # (R, D, k) orthonormal principal directions
    variances: Tensor  # (R, k)
    residual: Tensor  # (R,) mean variance of the directions outside the basis
    shape: tuple[int, ...]
    num_classes: int | None = None

    @property
    def whole(self) -> int:
        """The row of the whole data set."""
        return self.means.shape[0] - 1

    def rows_for(self, y: Tensor | None, batch: int) -> Tensor:
        """Each image's row: its class's, or the whole data set's when there are no labels."""
        if y is None or self.num_classes is None:
            return torch.full((batch,), self.whole, dtype=torch.long)
        y = y.long().cpu()
        if ((y < 0) | (y > self.num_classes)).any():
            raise ValueError(
                f"class labels must be in 0..{self.num_classes} (the last is unconditional)"
            )
        return y.clamp(max=self.whole)  # the null label of guidance is the whole data set

    def flow(self, x: Tensor, rows: Tensor, a0: float, s0: float, a1: float, s1: float) -> Tensor:
        """The exact flow of each image's Gaussian from (alpha, sigma) = (a0, s0) to (a1, s1)."""

        def one(z: Tensor, r: int) -> Tensor:
            coords = z @ self.basis[r]
            ratio = (
                (a1**2 * self.variances[r] + s1**2) / (a0**2 * self.variances[r] + s0**2)
            ).sqrt()
            rest = ((a1**2 * self.residual[r] + s1**2) / (a0**2 * self.residual[r] + s0**2)).sqrt()
            return (
                a1 * self.means[r]
                + (coords * ratio) @ self.basis[r].T
                + rest * (z - coords @ self.basis[r].T)
            )

        return self._per_row(x, rows, a0, one)

    def denoise(self, x: Tensor, rows: Tensor, a: float, s: float) -> Tensor:
        """E[x0 | x_t = x] under each image's Gaussian (flattened images, float64)."""

        def one(z: Tensor, r: int) -> Tensor:
            coords = z @ self.basis[r]
            gain = a * self.variances[r] / (a * a * self.variances[r] + s * s)
            rest = a * self.residual[r] / (a * a * self.residual[r] + s * s)
            return (
                self.means[r]
                + (coords * gain) @ self.basis[r].T
                + rest * (z - coords @ self.basis[r].T)
            )

        return self._per_row(x, rows, a, one)

    def _per_row(
        self, x: Tensor, rows: Tensor, a: float, fn: Callable[[Tensor, int], Tensor]
    ) -> Tensor:
        """``fn(x - a * mean, row)`` for the images of each row, reassembled in order."""
        out = torch.empty_like(x)
        for r in rows.unique().tolist():
            mask = rows == r
            out[mask] = fn(x[mask] - a * self.means[r], r)
        return out

    def to_dict(self) -> dict:
        """JSON-ready: arrays as base64 of little-endian float32."""
        return {
            "format": GAUSSIAN_FORMAT,
            "shape": list(self.shape),
            "num_classes": self.num_classes,
            "rank": self.basis.shape[-1],
            "means": _pack(self.means),
            "basis": _pack(self.basis),
            "variances": _pack(self.variances),
            "residual": _pack(self.residual),
        }

    @classmethod
    def from_dict(cls, data: dict) -> GaussianData:
        """Inverse of :meth:`to_dict` (a ValueError for another format)."""
        if data.get("format") != GAUSSIAN_FORMAT:
            raise ValueError(f"unknown Gaussian format {data.get('format')!r}")
        shape, k = tuple(int(s) for s in data["shape"]), int(data["rank"])
        d = math.prod(shape)
        num_classes = data.get("num_classes")
        r = (num_classes or 0) + 1
        return cls(
            _unpack(data["means"], (r, d)),
            _unpack(data["basis"], (r, d, k)),
            _unpack(data["variances"], (r, k)),
            _unpack(data["residual"], (r,)),
            shape,
            None if num_classes is None else int(num_classes),
        )

    def digest(self) -> str:
        """sha256 of the stored arrays (what a run's identity records instead of the arrays)."""
        h = hashlib.sha256()
        for a in (self.means, self.basis, self.variances, self.residual):
            h.update(a.to(torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class Teleport:
    """Replace the start of sampling by the Gaussian's ODE solution: ``noise`` at the schedule's
    t_max becomes x at the sampler's first time. ``guidance_scale`` must be the sampler's."""

    data: GaussianData
    guidance_scale: float = 1.0
    rk_steps: int = 100

    def __call__(
        self, noise: Tensor, schedule: VPSchedule, t_to: float, y: Tensor | None = None
    ) -> Tensor:
        if tuple(noise.shape[1:]) != self.data.shape:
            raise ValueError(
                f"the teleport's Gaussian is for images of shape {self.data.shape}, "
                f"not {tuple(noise.shape[1:])}; calibrate it for this model"
            )
        t0 = schedule.t_max
        if not t_to <= t0:
            raise ValueError(f"cannot teleport from t = {t0} up to t = {t_to}")
        if t_to == t0:
            return noise
        x = noise.flatten(1).double().cpu()
        rows = self.data.rows_for(y, x.shape[0])
        a = lambda t: float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
        s = lambda t: float(schedule.sigma(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
        if self.guidance_scale == 1.0 or self.data.num_classes is None or y is None:
            out = self.data.flow(x, rows, a(t0), s(t0), a(t_to), s(t_to))
        else:
            out = self._guided(x, rows, schedule, t0, t_to)
        return out.reshape(noise.shape).to(device=noise.device, dtype=noise.dtype)

    def _guided(
        self, x: Tensor, rows: Tensor, schedule: VPSchedule, t0: float, t1: float
    ) -> Tensor:
        """RK4 in lambda on u = x / sigma: du/dlambda = e^lambda D(x), D the guided Gaussian denoiser."""
        g, whole = self.guidance_scale, torch.full_like(rows, self.data.whole)
        lam = schedule.lambda_(torch.tensor([t0, t1], dtype=torch.float64)).tolist()

        def at(lam_: float) -> tuple[float, float]:
            t = schedule.t_of_lambda(torch.tensor(lam_, dtype=torch.float64))
            return float(schedule.alpha(t)), float(schedule.sigma(t))

        def f(lam_: float, u: Tensor) -> Tensor:
            a, s = at(lam_)
            xs = s * u
            cond, uncond = self.data.denoise(xs, rows, a, s), self.data.denoise(xs, whole, a, s)
            return torch.exp(torch.tensor(lam_, dtype=torch.float64)) * (
                uncond + g * (cond - uncond)
            )

        h = (lam[1] - lam[0]) / self.rk_steps
        u = x / at(lam[0])[1]
        for i in range(self.rk_steps):
            lam_ = lam[0] + i * h
            k1 = f(lam_, u)
            k2 = f(lam_ + h / 2, u + h / 2 * k1)
            k3 = f(lam_ + h / 2, u + h / 2 * k2)
            k4 = f(lam_ + h, u + h * k3)
            u = u + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return at(lam[1])[1] * u

    def record(self) -> dict:
        """What a teleporting path's settings say of it (its path file stores the Gaussian)."""
        return {
            "guidance_scale": self.guidance_scale,
            "gaussian_sha256": self.data.digest(),
            "rk_steps": self.rk_steps,
        }

    def __repr__(self) -> str:  # a run's identity records this, not the arrays
        return f"Teleport(gaussian sha256 {self.data.digest()[:16]}, guidance_scale={self.guidance_scale})"


def _pack(t: Tensor) -> str:
    return base64.b64encode(
        t.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
    ).decode("ascii")


def _unpack(text: str, shape: tuple[int, ...]) -> Tensor:
    import numpy as np

    raw = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if raw.size != int(np.prod(shape)):
        raise ValueError(
            f"a stored Gaussian array has {raw.size} numbers, expected {int(np.prod(shape))}"
        )
    return torch.from_numpy(raw.copy()).double().reshape(shape)
