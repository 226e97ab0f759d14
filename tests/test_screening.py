"""Calibration images that represent the hard tail : the screen finds the images a
few-step solve gets most wrong, the stratified draw keeps them and weighs every image so the
weighted error still estimates the mean over all images, and calibration uses those weights."""

import pytest
import torch

from pdm.calibration import calibrate_budgets, rms
from pdm.calibration.screening import screening_scores, stratified_draw
from pdm.sampling import sample
from pdm.schedule import VPSchedule
from pdm.testing import GaussianMixture

S = VPSchedule.linear()
GM = GaussianMixture.random(components=4, shape=(3, 4, 4), std=0.3)


def _noise(n, seed):
    return torch.randn(
        n, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


def test_weighted_rms_is_the_root_of_the_weighted_mean_square_per_image():
    a, b = _noise(3, 0), _noise(3, 1)
    per_image = (a - b).pow(2).flatten(1).mean(1)
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert rms(a, b, w) == pytest.approx(float((w * per_image).sum().sqrt()), rel=1e-12)
    assert rms(a, b, torch.full((3,), 1 / 3, dtype=torch.float64)) == pytest.approx(
        rms(a, b), rel=1e-12
    )


def test_the_draw_keeps_the_hardest_candidates_in_both_parts_and_is_unbiased():
    # a population with a rare, very large tail: 4 of 200 values are 100x the rest
    g = torch.Generator().manual_seed(0)
    values = torch.rand(200, generator=g, dtype=torch.float64)
    values[[3, 50, 120, 199]] = 100.0
    scores = values + 0.1 * torch.rand(200, generator=g, dtype=torch.float64)  # a noisy screen
    draw = stratified_draw(scores, fit=12, validation=4, hard_fraction=0.25, seed=5)
    assert (
        len(draw.fit) == 12
        and len(draw.validation) == 4
        and not set(draw.fit) & set(draw.validation)
    )
    assert len(draw.hard) == 4 and set(draw.hard) == {
        3,
        50,
        120,
        199,
    }  # 3 hard fit, 1 hard validates
    assert (
        len(set(draw.fit) & set(draw.hard)) == 3 and len(set(draw.validation) & set(draw.hard)) == 1
    )
    assert sum(draw.fit_weights) == pytest.approx(1.0) and sum(
        draw.validation_weights
    ) == pytest.approx(1.0)
    assert draw.indices == draw.fit + draw.validation and draw.weights.shape == (16,)
    # unbiased for the mean, with far less spread than an unweighted random draw of as many images
    stratified, plain = [], []
    for seed in range(400):
        d = stratified_draw(scores, fit=12, validation=4, hard_fraction=0.25, seed=seed)
        stratified.append(
            float((torch.tensor(d.fit_weights, dtype=torch.float64) * values[d.fit]).sum())
        )
        plain.append(
            float(
                values[
                    torch.randperm(200, generator=torch.Generator().manual_seed(seed))[:12]
                ].mean()
            )
        )
    stratified, plain = torch.tensor(stratified), torch.tensor(plain)
    assert float(stratified.mean()) == pytest.approx(float(values.mean()), rel=0.01)
    assert float(stratified.std()) < 0.05 * float(plain.std())


def test_the_draw_without_spare_candidates_takes_every_image_equally():
    draw = stratified_draw(torch.arange(6.0), fit=4, validation=2)
    assert draw.fit == [0, 1, 2, 3] and draw.validation == [4, 5] and draw.hard == []
    assert draw.fit_weights == [0.25] * 4 and draw.validation_weights == [0.5] * 2
    with pytest.raises(ValueError, match="screen at least as many"):
        stratified_draw(torch.arange(6.0), fit=5, validation=2)
    with pytest.raises(ValueError, match="hard fraction"):
        stratified_draw(torch.arange(60.0), fit=5, validation=2, hard_fraction=1.0)


def test_the_screen_ranks_images_by_their_few_step_error():
    # the screen's score is the few-step solve's own error against a finer one, so the images
    # it ranks highest are the ones a 10-step solve gets most wrong against an accurate solution
    noise = _noise(48, 3)
    fn = GM.model_fn(S)
    scores = screening_scores(fn, noise, S, batch=20)
    assert scores.shape == (48,) and (scores >= 0).all()
    accurate = sample(fn, noise, S, steps=300, solver="unipc", order=3, skip_type="logSNR").x
    cheap = sample(fn, noise, S, steps=10, solver="ipndm", order=3, skip_type="logSNR").x
    error = (cheap - accurate).flatten(1).pow(2).mean(1).sqrt()
    top = scores.argsort(descending=True)[:5]
    assert float(error[top].min()) > float(error.median())
    assert torch.corrcoef(torch.stack([scores, error]))[0, 1] > 0.95


def test_calibration_weighs_the_fitting_and_the_validation_images():
    # all the fitting weight on one image: the reported fit error is that image's error alone
    noise = _noise(8, 11)
    w = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    kw = dict(solver="ipndm", order=3, skip_type="logSNR")
    paths = calibrate_budgets(
        GM.model_fn(S),
        noise,
        S,
        [4],
        validation=0.25,
        steps=12,
        halvings=1,
        refine_sweeps=1,
        continuous=False,
        weights=w,
        **kw,
    )
    path = paths[4]
    accurate = sample(
        GM.model_fn(S), noise, S, steps=300, solver="unipc", order=3, skip_type="logSNR"
    ).x
    x = sample(GM.model_fn(S), noise, S, path.settings_for(S)).x
    report = path.calibration
    # (the calibration's own reference is a little less accurate than this one: 0.2% apart)
    assert report["fit_error"] == pytest.approx(rms(x[2:3], accurate[2:3]), rel=5e-3)
    assert report["validation_error"] == pytest.approx(rms(x[6:], accurate[6:]), rel=5e-3)
    assert (
        abs(rms(x[:6], accurate[:6]) / rms(x[2:3], accurate[2:3]) - 1) > 0.05
    )  # the weights decided it
    with pytest.raises(ValueError, match="one weight per calibration image"):
        calibrate_budgets(GM.model_fn(S), noise, S, [4], steps=12, weights=w[:5], **kw)
