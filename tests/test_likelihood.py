"""The held-out bound (pdm.metrics.likelihood) against closed forms.

Gaussian data x ~ N(0, s² I) in d dimensions has the exact denoiser x̂ = alpha s² z / (alpha² s² +
sigma²), whose squared error is d s² / (1 + v s²) at SNR v. So the diffusion term of VDM's bound is
(d/2) ln((1 + SNR_max s²) / (1 + SNR_min s²)) exactly, and prior + diffusion + reconstruction equal
the exact negative log-likelihood up to the endpoint terms: the prior KL at SNR_min (here ~1e-3
nats) and the reconstruction's (d/2) ln(1 + 1/(SNR_max s²)) (here d · 8e-3 nats at s = 0.25).
"""

from __future__ import annotations

import math

import pytest
import torch

from pdm.metrics.likelihood import (
    heldout_bound,
    prior_nats,
    quantize_8bit,
    reconstruction_nats,
    snr_range,
)
from pdm.schedule import VPSchedule

SCHEDULE = VPSchedule.linear()
D = 3 * 8 * 8


def exact_denoiser(s: float):
    def denoise(z, t, y):
        v = (SCHEDULE.alpha(t.double()) / SCHEDULE.sigma(t.double())) ** 2
        a2, s2 = v / (1 + v), 1 / (1 + v)
        return (a2.sqrt() * s * s / (a2 * s * s + s2))[:, None, None, None] * z.double()

    return denoise


def gaussian(s: float, n: int = 2048) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * s


def exact_nll(x: torch.Tensor, s: float) -> torch.Tensor:
    """-log N(x; 0, s²) per image, in nats."""
    flat = x.double().flatten(1)
    return (0.5 * math.log(2 * math.pi * s * s) + flat.pow(2) / (2 * s * s)).sum(1)


def test_the_diffusion_term_of_gaussian_data_is_the_closed_form():
    s = 0.5
    bound = heldout_bound(exact_denoiser(s), gaussian(s), SCHEDULE, quantize=False, seed=3)
    lo, hi = snr_range(SCHEDULE)
    closed = D / 2 * math.log((1 + hi * s * s) / (1 + lo * s * s))
    per_image = torch.as_tensor(bound.per_image)
    se = float(per_image.std() / math.sqrt(len(per_image)))
    assert abs(bound.diffusion.sum() - closed) < 4 * se
    assert se < 0.005 * closed  # the test can tell a wrong weight or a missing bin
    # the binned RMSE is the closed form at the bin's SNRs (between the edges' values)
    for k, rmse in enumerate(bound.rmse):
        v_lo, v_hi = math.exp(bound.log_snr_edges[k]), math.exp(bound.log_snr_edges[k + 1])
        top, bottom = math.sqrt(s * s / (1 + v_lo * s * s)), math.sqrt(s * s / (1 + v_hi * s * s))
        assert bottom * 0.95 < rmse < top * 1.05


@pytest.mark.parametrize("quantize", [False, True])
def test_the_whole_bound_is_the_exact_likelihood_up_to_the_endpoint_terms(quantize):
    s = 0.25  # |x| > 1 (clipped by 8 bits) at 4 standard deviations only
    x = gaussian(s)
    bound = heldout_bound(exact_denoiser(s), x, SCHEDULE, quantize=quantize, seed=3)
    nll = exact_nll(quantize_8bit(x) if quantize else x, s)
    if quantize:  # the probability of an 8-bit level: the density times the level's width
        nll = nll - D * math.log(2 / 255)
    per_image = torch.as_tensor(bound.per_image)
    gap = float(per_image.mean() - nll.mean())
    se = float((per_image - nll).std() / math.sqrt(len(x)))
    endpoint = D / 2 * math.log(1 + 1 / (snr_range(SCHEDULE)[1] * s * s))
    assert abs(gap - endpoint) < 4 * se + 0.05 * endpoint
    # in bits per dimension, as the report gives it
    assert bound.bits_per_dim == pytest.approx(float(per_image.mean()) / (D * math.log(2)))


def test_endpoint_terms_closed_forms():
    x = torch.linspace(-1, 1, 12).reshape(1, 3, 2, 2)
    v = 0.3
    a2, s2 = v / (1 + v), 1 / (1 + v)
    want = 0.5 * sum(a2 * float(xi) ** 2 + s2 - 1 - math.log(s2) for xi in x.flatten())
    assert float(prior_nats(x, v)[0]) == pytest.approx(want, rel=1e-12)
    # the decoder is a distribution over the 256 levels: at a very high SNR it is certain
    levels = quantize_8bit(torch.rand(4, 3, 4, 4) * 2 - 1)
    noise = torch.randn(levels.shape)
    assert reconstruction_nats(levels, 1e9, noise).abs().max() < 1e-6
    # at SNR 1/level-width², z on its level, an interior level weighs exp(0) against the sum of
    # exp(-k²/2) over the other levels: sqrt(2 pi) (to 1e-8), so it costs ln(2 pi)/2 nats
    interior = quantize_8bit(torch.rand(4, 3, 4, 4) * 1.6 - 0.8)
    cost = reconstruction_nats(interior, 127.5**2, torch.zeros_like(interior))
    assert float(cost.mean()) / interior[0].numel() == pytest.approx(0.5 * math.log(2 * math.pi))


def test_the_noise_is_fixed_by_the_seed_and_the_same_for_every_model():
    x = gaussian(0.5, 16)
    seen: list[list[torch.Tensor]] = [[], []]

    def recorder(i, scale):
        def denoise(z, t, y):
            seen[i].append(z.clone())
            return scale * z.double()

        return denoise

    a = heldout_bound(recorder(0, 0.1), x, SCHEDULE, num_bins=4, seed=7)
    b = heldout_bound(recorder(1, 0.2), x, SCHEDULE, num_bins=4, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(seen[0], seen[1]))  # common random numbers
    assert a.bits_per_dim != b.bits_per_dim
    again = heldout_bound(recorder(0, 0.1), x, SCHEDULE, num_bins=4, seed=7)
    assert again.bits_per_dim == a.bits_per_dim
    other = heldout_bound(recorder(0, 0.1), x, SCHEDULE, num_bins=4, seed=8)
    assert other.bits_per_dim != a.bits_per_dim


def test_labels_reach_the_denoiser_and_bins_are_checked():
    x = gaussian(0.5, 8)
    got = []

    def denoise(z, t, y):
        got.append(y)
        return z.double() * 0

    heldout_bound(denoise, x, SCHEDULE, labels=torch.arange(8), num_bins=2)
    assert all(torch.equal(y, torch.arange(8)) for y in got)
    with pytest.raises(ValueError, match="num_bins"):
        heldout_bound(denoise, x, SCHEDULE, num_bins=0)
