"""The variance-preserving (VP) noise schedule in continuous time.

A discrete DDPM schedule (betas over N steps) is turned into continuous time with the
convention of the official DPM-Solver code (Lu et al. 2022, arXiv 2206.00927, App. D):
step n = 0..N-1 sits at t_n = (n + 1) / N, and log alpha is interpolated piecewise-linearly
in t between those knots (and extrapolated linearly beyond them). The network's label of a
continuous time is N * (t - 1/N), which lands on the integer n at t_n.

Symbols: x_t = alpha(t) x0 + sigma(t) eps, alpha^2 + sigma^2 = 1,
lambda(t) = log(alpha / sigma) = log_snr(t) / 2.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

SkipType = Literal["time_uniform", "logSNR", "time_quadratic", "edm"]
SKIP_TYPES: tuple[str, ...] = get_args(SkipType)
ScheduleName = Literal["linear", "cosine"]
EDM_RHO = 7.0  # Karras et al. 2022, eq. 5: the polynomial grid in sigma that EDM and iPNDM use


def interp_linear(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, extrapolating the end segments.

    xp must be increasing. Works for any shape of x and keeps x's dtype.
    """
    xp = xp.to(device=x.device, dtype=x.dtype)
    fp = fp.to(device=x.device, dtype=x.dtype)
    idx = torch.searchsorted(xp, x.detach().contiguous(), right=False)
    idx = idx.clamp(1, xp.numel() - 1)
    # torch.take gathers for an index tensor of any shape; indexing with a 0-d tensor would read
    # the index back to the host (a GPU synchronisation for every time point)
    x_lo, x_hi = torch.take(xp, idx - 1), torch.take(xp, idx)
    f_lo, f_hi = torch.take(fp, idx - 1), torch.take(fp, idx)
    return f_lo + (x - x_lo) * (f_hi - f_lo) / (x_hi - x_lo)


def linear_betas(
    beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000
) -> Tensor:
    """DDPM's linear betas (Ho et al. 2020), in float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64, device="cpu")


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """iDDPM's cosine betas (Nichol & Dhariwal 2021, eq. 17), clipped at ``max_beta``."""
    n = torch.arange(num_timesteps + 1, dtype=torch.float64, device="cpu")
    alpha_bar = torch.cos((n / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


class VPSchedule:
    """A discrete VP schedule seen in continuous time t in [1/N, 1].

    Build it with :meth:`linear`, :meth:`cosine` or :meth:`from_betas`. Every method takes a
    float tensor ``t`` and answers in ``t``'s dtype, so passing float64 times gives float64
    coefficients.
    """

    def __init__(self, betas: Tensor, name: str = "custom") -> None:
        betas = torch.as_tensor(
            betas, dtype=torch.float64, device="cpu"
        ).flatten()  # tables live on the CPU
        if betas.numel() < 2:
            raise ValueError("a VP schedule needs at least 2 betas")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1); check beta_start / beta_end")
        self.name = name
        self.betas = betas
        self.num_timesteps = betas.numel()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Knots of the continuous-time view: t_n = (n + 1) / N, log alpha_n = 0.5 log(abar_n).
        n = self.num_timesteps
        self.t_array = torch.arange(1, n + 1, dtype=torch.float64, device="cpu") / n
        self.log_alpha_array = 0.5 * torch.log(self.alphas_cumprod)
        self._knot_copies: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _knots(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(t_array, log_alpha_array) on ``like``'s device in its dtype, copied there once: a
        copy per call would be a host-to-device transfer, and a GPU synchronisation, for every
        coefficient a sampler asks for."""
        key = (like.device, like.dtype)
        if key not in self._knot_copies:
            self._knot_copies[key] = (
                self.t_array.to(like.device, like.dtype),
                self.log_alpha_array.to(like.device, like.dtype),
            )
        return self._knot_copies[key]

    # construction ------------------------------------------------------------------------
    @classmethod
    def linear(
        cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000
    ) -> VPSchedule:
        """DDPM's linear schedule (PDM's default; FFHQ-1024 uses beta_end = 0.025)."""
        return cls(linear_betas(beta_start, beta_end, num_timesteps), name="linear")

    @classmethod
    def cosine(cls, num_timesteps: int = 1000) -> VPSchedule:
        """iDDPM's cosine schedule, discretised to ``num_timesteps`` betas."""
        return cls(cosine_betas(num_timesteps), name="cosine")

    @classmethod
    def from_betas(cls, betas: Tensor) -> VPSchedule:
        """Any discrete schedule given by its betas."""
        return cls(betas, name="custom")

    # range -------------------------------------------------------------------------------
    @property
    def t_min(self) -> float:
        """The smallest time of the schedule, 1/N (the first discrete step)."""
        return 1.0 / self.num_timesteps

    @property
    def t_max(self) -> float:
        """The largest time of the schedule, 1.0 (the last discrete step)."""
        return 1.0

    # coefficients --------------------------------------------------------------------------
    def log_alpha(self, t: Tensor) -> Tensor:
        """log alpha(t), piecewise-linear in t between the discrete knots."""
        t = _as_float(t)
        return interp_linear(t, *self._knots(t))

    def alpha(self, t: Tensor) -> Tensor:
        """alpha(t) = sqrt(alphā at t)."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = sqrt(1 - alpha(t)^2)."""
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t: Tensor) -> Tensor:
        """lambda(t) = log alpha - log sigma, half the log-SNR."""
        log_alpha = self.log_alpha(t)
        log_sigma = 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))
        return log_alpha - log_sigma

    def log_snr(self, t: Tensor) -> Tensor:
        """log SNR(t) = 2 lambda(t)."""
        return 2.0 * self.lambda_(t)

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        """The inverse of :meth:`lambda_`: the time whose half-log-SNR is ``lam``."""
        lam = _as_float(lam)
        # log alpha = -0.5 log(1 + exp(-2 lambda)), then invert the monotone knots.
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        t_knots, log_alpha_knots = self._knots(log_alpha)
        return interp_linear(log_alpha, log_alpha_knots.flip(0), t_knots.flip(0))

    def t_of_snr(self, snr: float | Tensor) -> Tensor:
        """The time at which SNR(t) equals ``snr``."""
        snr = _as_float(torch.as_tensor(snr, dtype=torch.float64))
        return self.t_of_lambda(0.5 * torch.log(snr))

    # the network's view ---------------------------------------------------------------------
    def label(self, t: Tensor) -> Tensor:
        """The network's time label N * (t - 1/N): the integer n at t_n, in [0, N-1]."""
        return (_as_float(t) - self.t_min) * self.num_timesteps

    def t_of_label(self, label: Tensor) -> Tensor:
        """The continuous time of a (possibly fractional) discrete label."""
        return _as_float(label) / self.num_timesteps + self.t_min

    def index_where_snr_below(self, snr: float) -> int:
        """The first discrete step n whose SNR is below ``snr`` (PDM's expert split: 396)."""
        snrs = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        below = torch.nonzero(snrs < snr)
        if below.numel() == 0:
            raise ValueError(f"no step of this schedule has SNR below {snr}")
        return int(below[0])

    # time grids -------------------------------------------------------------------------------
    def timesteps(
        self,
        steps: int,
        skip_type: SkipType = "time_uniform",
        t_start: float | None = None,
        t_end: float | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The decreasing grid of ``steps + 1`` times from ``t_start`` (default t_max) to ``t_end``.

        ``time_uniform`` spaces t evenly, ``logSNR`` spaces lambda evenly and
        ``time_quadratic`` spaces sqrt(t) evenly (as in the official DPM-Solver); ``edm`` spaces
        sigma_edm^(1/rho) evenly, with sigma_edm = sigma / alpha = exp(-lambda) and rho = 7
        (Karras et al. 2022, eq. 5), then maps each sigma back to t.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        t_T = self.t_max if t_start is None else float(t_start)
        t_0 = self.t_min if t_end is None else float(t_end)
        if not t_T > t_0:
            raise ValueError(f"t_start ({t_T}) must be greater than t_end ({t_0})")
        if skip_type == "time_uniform":
            return torch.linspace(t_T, t_0, steps + 1, dtype=dtype, device=device)
        if skip_type == "logSNR":
            ends = torch.tensor([t_T, t_0], dtype=torch.float64)
            lam_T, lam_0 = self.lambda_(ends).tolist()
            lams = torch.linspace(lam_T, lam_0, steps + 1, dtype=torch.float64)
            return self.t_of_lambda(lams).to(dtype=dtype, device=device)
        if skip_type == "time_quadratic":
            grid = torch.linspace(math.sqrt(t_T), math.sqrt(t_0), steps + 1, dtype=torch.float64)
            return (grid**2).to(dtype=dtype, device=device)
        if skip_type == "edm":
            ends = torch.tensor([t_T, t_0], dtype=torch.float64)
            s_max, s_min = torch.exp(-self.lambda_(ends)).tolist()
            ramp = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
            sig = (
                s_max ** (1 / EDM_RHO) + ramp * (s_min ** (1 / EDM_RHO) - s_max ** (1 / EDM_RHO))
            ) ** EDM_RHO
            grid = self.t_of_lambda(-torch.log(sig))
            grid[0], grid[-1] = t_T, t_0  # exact ends, whatever the inverse's rounding
            return grid.to(dtype=dtype, device=device)
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(SKIP_TYPES)}")

    def __repr__(self) -> str:
        return f"VPSchedule(name={self.name!r}, num_timesteps={self.num_timesteps})"


def build_schedule(
    name: ScheduleName = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_timesteps: int = 1000,
) -> VPSchedule:
    """The schedule a config names: ``linear`` (DDPM/PDM, from beta_start to beta_end) or ``cosine`` (iDDPM)."""
    if name == "linear":
        return VPSchedule.linear(beta_start, beta_end, num_timesteps)
    if name == "cosine":
        return VPSchedule.cosine(num_timesteps)
    raise ValueError(f"unknown schedule {name!r}; choose linear or cosine")


def _as_float(t: Tensor | float) -> Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())
