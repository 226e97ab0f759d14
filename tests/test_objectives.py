"""Targets, their exact conversions, and the SNR weightings of the x0-space error."""

import pytest
import torch

from pdm.objectives import convert, loss_weight, target_from, to_eps, to_v, to_x0, weighted_x0_loss
from pdm.schedule import VPSchedule


@pytest.fixture
def noised():
    g = torch.Generator().manual_seed(0)
    s = VPSchedule.linear()
    t = torch.tensor([0.002, 0.1, 0.5, 0.95], dtype=torch.float64)
    alpha, sigma = s.alpha(t), s.sigma(t)
    x0 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    return x0, eps, x_t, alpha, sigma


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_every_target_converts_back_to_the_true_x0_and_eps(noised, kind):
    x0, eps, x_t, alpha, sigma = noised
    pred = target_from(x0, eps, alpha, sigma, kind)
    assert torch.allclose(to_x0(pred, x_t, alpha, sigma, kind), x0, atol=1e-9)
    assert torch.allclose(to_eps(pred, x_t, alpha, sigma, kind), eps, atol=1e-9)


@pytest.mark.parametrize("source", ["eps", "x0", "v"])
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_conversions_round_trip(noised, source, target):
    _, _, x_t, alpha, sigma = noised
    pred = torch.randn_like(x_t)
    there = convert(pred, x_t, alpha, sigma, source, target)
    back = convert(there, x_t, alpha, sigma, target, source)
    assert torch.allclose(back, pred, atol=1e-8)


def test_v_is_alpha_eps_minus_sigma_x0(noised):
    x0, eps, x_t, alpha, sigma = noised
    v = target_from(x0, eps, alpha, sigma, "v")
    assert torch.allclose(to_v(x0, x_t, alpha, sigma, "x0"), v, atol=1e-9)
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    assert torch.allclose(v, a * eps - s * x0, atol=0)


def test_x0_mse_times_snr_equals_eps_mse(noised):
    x0, eps, x_t, alpha, sigma = noised
    eps_hat = eps + 0.1 * torch.randn_like(eps)
    x0_hat = to_x0(eps_hat, x_t, alpha, sigma, "eps")
    snr = (alpha / sigma) ** 2
    x0_mse = (x0_hat - x0).pow(2).flatten(1).mean(1)
    eps_mse = (eps_hat - eps).pow(2).flatten(1).mean(1)
    assert torch.allclose(x0_mse * snr, eps_mse, rtol=1e-9)


def _x0_mse(pred, kind, noised):
    x0, _, x_t, alpha, sigma = noised
    return (to_x0(pred, x_t, alpha, sigma, kind) - x0).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize(
    "weighting", ["sqrt_snr", "snr", "snr_plus_one", "truncated_snr", "min_snr", "p2", "constant"]
)
def test_weighted_loss_is_weight_times_x0_error_for_every_target(noised, kind, weighting):
    x0, eps, x_t, alpha, sigma = noised
    pred = target_from(x0, eps, alpha, sigma, kind) + 0.05 * torch.randn_like(x0)
    got = weighted_x0_loss(pred, x0, eps, alpha, sigma, target=kind, weighting=weighting)
    ref = loss_weight((alpha / sigma) ** 2, weighting) * _x0_mse(pred, kind, noised)
    assert torch.allclose(got, ref, rtol=1e-6)


def test_snr_weighting_on_eps_target_is_plain_eps_mse(noised):
    x0, eps, _, alpha, sigma = noised
    eps_hat = eps + 0.1 * torch.randn_like(eps)
    got = weighted_x0_loss(eps_hat, x0, eps, alpha, sigma, target="eps", weighting="snr")
    assert torch.allclose(got, (eps_hat - eps).pow(2).flatten(1).mean(1), rtol=1e-12)


def test_snr_plus_one_weighting_on_v_target_is_plain_v_mse(noised):
    x0, eps, _, alpha, sigma = noised
    v = target_from(x0, eps, alpha, sigma, "v")
    v_hat = v + 0.1 * torch.randn_like(v)
    got = weighted_x0_loss(v_hat, x0, eps, alpha, sigma, target="v", weighting="snr_plus_one")
    assert torch.allclose(got, (v_hat - v).pow(2).flatten(1).mean(1), rtol=1e-12)


def test_weighting_values():
    snr = torch.tensor([0.01, 0.25, 1.0, 4.0, 100.0], dtype=torch.float64)
    assert torch.allclose(
        loss_weight(snr, "sqrt_snr"), torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0], dtype=torch.float64)
    )
    assert torch.allclose(
        loss_weight(snr, "truncated_snr"), torch.tensor([1, 1, 1, 4, 100], dtype=torch.float64)
    )
    assert torch.allclose(
        loss_weight(snr, "min_snr", gamma=5.0),
        torch.tensor([0.01, 0.25, 1, 4, 5], dtype=torch.float64),
    )
    assert torch.allclose(loss_weight(snr, "p2"), snr / (1 + snr))
    assert torch.allclose(loss_weight(snr, "constant"), torch.ones_like(snr))


def test_unknown_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="sqrt_snr"):
        loss_weight(torch.ones(1), "lpips")
    with pytest.raises(ValueError, match="eps, x0, v"):
        to_x0(torch.ones(1), torch.ones(1), torch.ones(1), torch.ones(1), "score")
