"""VPSchedule against independent references: explicit products, closed forms, diffusers."""

import math

import pytest
import torch

from pdm.schedule import VPSchedule


def test_alpha_squared_at_knots_is_cumulative_product_of_one_minus_beta():
    s = VPSchedule.linear(beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
    # reference: a plain Python loop over DDPM's betas, no torch cumprod
    prod, expected = 1.0, []
    for n in range(1000):
        beta = 1e-4 + (0.02 - 1e-4) * n / 999
        prod *= 1.0 - beta
        expected.append(prod)
    t_n = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    got = s.alpha(t_n) ** 2
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_sigma_completes_alpha_to_unit_variance():
    s = VPSchedule.linear()
    t = torch.linspace(s.t_min, s.t_max, 777, dtype=torch.float64)
    assert torch.allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t), atol=1e-14)


def test_log_alpha_is_piecewise_linear_between_knots():
    s = VPSchedule.linear()
    n = 500
    t_a, t_b = (n + 1) / 1000, (n + 2) / 1000
    mid = torch.tensor([(t_a + t_b) / 2], dtype=torch.float64)
    expected = 0.25 * (
        math.log(s.alphas_cumprod[n].item()) + math.log(s.alphas_cumprod[n + 1].item())
    )
    assert s.log_alpha(mid).item() == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("make", [VPSchedule.linear, VPSchedule.cosine])
def test_t_of_lambda_inverts_lambda(make):
    s = make()
    t = torch.linspace(s.t_min, s.t_max, 5001, dtype=torch.float64)
    assert torch.allclose(s.t_of_lambda(s.lambda_(t)), t, atol=1e-10, rtol=0)


def test_lambda_is_half_log_snr():
    s = VPSchedule.linear()
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    ref = torch.log(s.alpha(t) ** 2 / s.sigma(t) ** 2) / 2
    assert torch.allclose(s.lambda_(t), ref, rtol=1e-12)
    assert torch.allclose(s.log_snr(t), 2 * ref, rtol=1e-12)


def test_snr_quarter_lands_at_step_396_of_1000():
    s = VPSchedule.linear()
    assert s.index_where_snr_below(0.25) == 396
    label = s.label(s.t_of_snr(0.25)).item()
    assert 395 < label < 396


def test_discrete_convention_of_official_dpm_solver():
    s = VPSchedule.linear()
    assert s.t_min == pytest.approx(1e-3) and s.t_max == 1.0
    t_n = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    assert torch.allclose(s.label(t_n), torch.arange(1000, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(s.t_of_label(s.label(t_n)), t_n, atol=1e-15)


def test_cosine_matches_diffusers_squaredcos_betas():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"
    ).betas.double()
    ours = VPSchedule.cosine(1000).betas
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_cosine_alpha_bar_follows_iddpm_closed_form_away_from_the_clip():
    s = VPSchedule.cosine(1000)
    f = lambda n: math.cos((n / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for n in (0, 100, 500, 900):
        assert s.alphas_cumprod[n].item() == pytest.approx(f(n + 1) / f(0), rel=1e-10)


def test_ffhq_beta_end_is_accepted_and_bad_betas_rejected():
    assert VPSchedule.linear(beta_end=0.025).betas[-1].item() == pytest.approx(0.025)
    with pytest.raises(ValueError, match="beta"):
        VPSchedule.from_betas(torch.tensor([0.1, 1.5]))


def test_float64_in_float64_out_and_float32_in_float32_out():
    s = VPSchedule.linear()
    assert s.alpha(torch.tensor([0.5], dtype=torch.float64)).dtype == torch.float64
    assert s.sigma(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32


def test_time_uniform_grid():
    s = VPSchedule.linear()
    g = s.timesteps(10, "time_uniform")
    assert g.shape == (11,) and g[0].item() == 1.0 and g[-1].item() == pytest.approx(1e-3)
    assert torch.allclose(
        g.diff(), torch.full((10,), -(1 - 1e-3) / 10, dtype=torch.float64), atol=1e-15
    )


def test_logsnr_grid_is_uniform_in_lambda():
    s = VPSchedule.linear()
    g = s.timesteps(20, "logSNR")
    lam = s.lambda_(g)
    assert torch.all(g.diff() < 0)
    assert torch.allclose(lam.diff(), lam.diff().mean().expand(20), rtol=1e-8)
    assert g[0].item() == pytest.approx(1.0, abs=1e-12) and g[-1].item() == pytest.approx(
        1e-3, abs=1e-12
    )


def test_time_quadratic_grid_is_uniform_in_sqrt_t():
    s = VPSchedule.linear()
    g = s.timesteps(8, "time_quadratic", t_start=0.9, t_end=0.01)
    root = g.sqrt()
    assert torch.allclose(root.diff(), root.diff().mean().expand(8), rtol=1e-12)
    assert g[0].item() == pytest.approx(0.9) and g[-1].item() == pytest.approx(0.01)


def test_unknown_skip_type_names_the_choices():
    with pytest.raises(ValueError, match="time_uniform, logSNR, time_quadratic"):
        VPSchedule.linear().timesteps(10, "karras")
