"""Held-out error of the x-prediction by noise level, and the variational bound it integrates to.

VDM (Kingma et al. 2021, §3) writes the negative ELBO of a diffusion model in continuous time as

    -log p(x) <= KL(q(z_min | x) || N(0, I))                        (prior, at SNR_min)
               + 1/2 E_eps ∫_{SNR_min}^{SNR_max} ||x - x̂(z_v, v)||² dv  (diffusion)
               + E[-log p(x | z_max)]                                 (reconstruction, at SNR_max)

with z_v = alpha x + sigma eps at SNR v = alpha²/sigma². The diffusion term is the held-out
error-by-noise-level curve of the PDM paper (§2.1), integrated over SNR: one measurement gives
the figure and a likelihood. pdm's discrete schedules fix the range: SNR_max at the first step
(t = 1/N), SNR_min at the last (t = 1).

The integral is estimated with stratified importance sampling: the log-SNR range is cut into
``num_bins`` bins of equal width; in each bin every image gets one SNR drawn uniformly in v (the
density the integrand's dv asks for, so the estimate is (v_hi - v_lo)/2 · ||x - x̂||², unbiased)
and one noise draw. The draws depend only on ``seed``, the bin and the image's position, never on
the model, so every model is scored on the same noise (common random numbers: differences
between models are far less noisy than either score).

Reconstruction uses VDM's decoder on 8-bit data: each pixel's 256 levels c weighted by the
Gaussian q(z_max | c) (a softmax over -(z/alpha - c)² SNR_max / 2), so the bound is a number of
bits for the 8-bit image on the [-1, 1] scale, and the decoder is the same for every model. With
``quantize=False`` (continuous data, as in the closed-form tests) it is the Gaussian density of
x around z/alpha with variance 1/SNR_max.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pdm.schedule import VPSchedule

Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""``denoise(z, t, y) -> x̂``: the x-prediction at noisy images z and continuous times t (B,)."""

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # 8-bit levels on [-1, 1]


@dataclass
class NoiseLevelBound:
    """The held-out curve and bound of one model on one set of images (see the module docstring).

    ``rmse[k]`` is the root mean squared error per dimension of x̂ in log-SNR bin k (edges
    ``log_snr_edges``); ``diffusion[k]`` the nats per image that bin adds to the bound;
    ``per_image`` each evaluation's whole bound in nats.
    """

    log_snr_edges: np.ndarray
    rmse: np.ndarray
    diffusion: np.ndarray
    prior: float
    reconstruction: float
    per_image: np.ndarray
    dims: int

    @property
    def log_snr_centres(self) -> np.ndarray:
        return 0.5 * (self.log_snr_edges[1:] + self.log_snr_edges[:-1])

    @property
    def bits_per_dim(self) -> float:
        """The bound in bits per dimension (mean over the evaluated images)."""
        return float(self.per_image.mean() / (self.dims * math.log(2)))

    def to_dict(self) -> dict:
        return {
            "log_snr_edges": self.log_snr_edges.tolist(),
            "rmse": self.rmse.tolist(),
            "diffusion_nats": self.diffusion.tolist(),
            "prior_nats": self.prior,
            "reconstruction_nats": self.reconstruction,
            "bits_per_dim": self.bits_per_dim,
            "dims": self.dims,
            "images": int(len(self.per_image)),
            "bits_per_dim_per_image_sd": float(self.per_image.std() / (self.dims * math.log(2))),
        }


def snr_range(schedule: VPSchedule) -> tuple[float, float]:
    """(SNR_min, SNR_max) of a discrete schedule: its last and first steps."""
    abar = schedule.alphas_cumprod
    snr = abar / (1 - abar)
    return float(snr[-1]), float(snr[0])


def quantize_8bit(x: Tensor) -> Tensor:
    """Images in [-1, 1] rounded to the nearest of the 256 8-bit levels."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def prior_nats(x: Tensor, snr_min: float) -> Tensor:
    """KL(N(alpha x, sigma²) || N(0, 1)) summed over dimensions, per image, at SNR ``snr_min``."""
    a2, s2 = snr_min / (1 + snr_min), 1 / (1 + snr_min)
    x = x.double().flatten(1)
    return 0.5 * (a2 * x.pow(2) + s2 - 1 - math.log(s2)).sum(1)


def reconstruction_nats(x: Tensor, snr_max: float, noise: Tensor, quantize: bool = True) -> Tensor:
    """-log p(x | z) per image at SNR ``snr_max`` with z = alpha x + sigma ``noise``: VDM's
    factorised decoder over the 256 levels (``quantize``), or a Gaussian density (not)."""
    x, noise = x.double().flatten(1), noise.double().flatten(1)
    # z / alpha = x + noise / sqrt(SNR)
    mean = x + noise / math.sqrt(snr_max)
    if not quantize:
        return (0.5 * math.log(2 * math.pi / snr_max) + 0.5 * snr_max * (x - mean).pow(2)).sum(1)
    level = torch.round((x + 1) * 127.5).long().clamp(0, 255)
    out = torch.empty(x.shape[0], dtype=torch.float64)
    levels = LEVELS.to(x.device)
    for i in range(x.shape[0]):  # one image at a time: (dims, 256) logits
        logits = -0.5 * snr_max * (mean[i, :, None] - levels).pow(2)
        logp = torch.log_softmax(logits, dim=1)
        out[i] = -logp.gather(1, level[i, :, None]).sum()
    return out


@torch.no_grad()
def heldout_bound(
    denoise: Denoiser,
    images: Tensor,
    schedule: VPSchedule,
    labels: Tensor | None = None,
    num_bins: int = 24,
    seed: int = 0,
    batch_size: int = 128,
    quantize: bool = True,
    snr_limits: tuple[float, float] | None = None,
    device: str | torch.device = "cpu",
) -> NoiseLevelBound:
    """The error-by-noise-level curve and the bound on ``images`` (B, C, H, W) in [-1, 1].

    ``images`` are rounded to 8 bits first (``quantize``). ``snr_limits`` overrides the
    schedule's (SNR_min, SNR_max). ``labels`` go to the denoiser as ``y`` (a class-conditional
    model is scored on p(x | y)). Deterministic for a given ``seed`` and image shape.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}")
    x = quantize_8bit(images.float()) if quantize else images.float()
    b, dims = x.shape[0], x[0].numel()
    snr_min, snr_max = snr_limits or snr_range(schedule)
    edges = np.linspace(math.log(snr_min), math.log(snr_max), num_bins + 1)
    g = torch.Generator().manual_seed(seed)
    diffusion = torch.zeros(num_bins, b, dtype=torch.float64)
    squared = torch.zeros(num_bins, dtype=torch.float64)
    for k in range(num_bins):
        v_lo, v_hi = math.exp(edges[k]), math.exp(edges[k + 1])
        u = torch.rand(b, generator=g, dtype=torch.float64)
        eps = torch.randn(x.shape, generator=g)
        v = v_lo + u * (v_hi - v_lo)
        t = schedule.t_of_snr(v)
        alpha, sigma = (v / (1 + v)).sqrt(), (1 / (1 + v)).sqrt()
        for i in range(0, b, batch_size):
            sl = slice(i, i + batch_size)
            z = (
                alpha[sl, None, None, None].float() * x[sl]
                + sigma[sl, None, None, None].float() * eps[sl]
            )
            y = None if labels is None else labels[sl].to(device)
            xhat = denoise(z.to(device), t[sl].to(device), y).double().cpu()
            err = (x[sl].double() - xhat).pow(2).flatten(1).sum(1)
            diffusion[k, sl] = 0.5 * (v_hi - v_lo) * err
            squared[k] += err.sum()
    rmse = (squared / (b * dims)).sqrt().numpy()
    prior = prior_nats(x, snr_min)
    recon = reconstruction_nats(x, snr_max, torch.randn(x.shape, generator=g), quantize)
    per_image = prior + diffusion.sum(0) + recon
    return NoiseLevelBound(
        log_snr_edges=edges,
        rmse=rmse,
        diffusion=diffusion.mean(1).numpy(),
        prior=float(prior.mean()),
        reconstruction=float(recon.mean()),
        per_image=per_image.numpy(),
        dims=dims,
    )
