"""Adaptive step skipping: exactness at threshold 0, the pattern at the limit, per-sample
independence, network rows, NFE accounting, and the official batch-shared decisions.

``AdaptiveSkip.official`` is the published method (latent criterion, reuse of the last
output); the plain ``AdaptiveSkip`` defaults (error criterion, forecast) are tested in
test_skip_forecast.py."""

import pytest
import torch

from pdm.calibration import CountingModel
from pdm.sampling import AdaptiveSkip, Settings, sample
from pdm.sampling.solvers import TimePoint, first_order_update
from pdm.schedule import VPSchedule
from pdm.testing import GaussianMixture

OLD = Settings(
    solver="dpmsolver++", order=2, grid="time_uniform"
)  # the sampler these tests were written for

S = VPSchedule.linear()
GM = GaussianMixture.random(components=4, shape=(3, 4, 4), std=0.3)
NOISE = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("solver, order", [("ddim", 1), ("dpmsolver++", 2), ("dpmsolver", 3)])
def test_threshold_zero_never_skips_and_reproduces_plain_sampling(solver, order):
    plain = sample(GM.model_fn(S), NOISE, S, OLD, steps=30, solver=solver, order=order)
    skipped = sample(
        GM.model_fn(S),
        NOISE,
        S,
        OLD,
        steps=30,
        solver=solver,
        order=order,
        skip=AdaptiveSkip(threshold=0.0),
    )
    assert torch.equal(plain.x, skipped.x)
    assert skipped.evaluated.all() and skipped.nfe == 30


@pytest.mark.parametrize("warmup, max_skips", [(4, 4), (5, 2), (6, 1)])
def test_huge_threshold_skips_at_the_maximum_rate(warmup, max_skips):
    steps = 30
    res = sample(
        GM.model_fn(S),
        NOISE,
        S,
        OLD,
        steps=steps,
        skip=AdaptiveSkip.official(threshold=1e9, max_skips=max_skips, warmup=warmup),
    )
    expected = [True] * warmup
    while len(expected) < steps:
        expected += [False] * max_skips + [True]
    expected = torch.tensor(expected[:steps])
    assert torch.equal(res.evaluated, expected[:, None].expand(steps, 6))
    assert res.nfe == float(expected.sum())


def test_per_sample_decisions_do_not_depend_on_the_batch():
    skip = AdaptiveSkip.official(threshold=0.05, max_skips=3)
    batch = sample(GM.model_fn(S), NOISE, S, OLD, steps=40, solver="dpmsolver++", skip=skip)
    assert 0 < (~batch.evaluated).sum() < batch.evaluated.numel()  # some skips, not all
    assert len({tuple(c.tolist()) for c in batch.evaluated.T}) > 1  # samples took different paths
    for b in range(NOISE.shape[0]):
        alone = sample(
            GM.model_fn(S), NOISE[b : b + 1], S, OLD, steps=40, solver="dpmsolver++", skip=skip
        )
        assert torch.equal(alone.evaluated[:, 0], batch.evaluated[:, b])
        assert torch.allclose(alone.x[0], batch.x[b], atol=1e-12)


@pytest.mark.parametrize("method, order", [("multistep", 2), ("singlestep", 3)])
def test_network_sees_only_the_evaluated_samples_and_nfe_counts_them(method, order):
    model = CountingModel(GM.model_fn(S))
    res = sample(
        model,
        NOISE,
        S,
        OLD,
        steps=30,
        solver="dpmsolver++",
        order=order,
        method=method,
        skip=AdaptiveSkip.official(threshold=0.05, max_skips=3),
    )
    assert model.rows == int(res.nfe_per_sample.sum())
    assert res.nfe == pytest.approx(res.nfe_per_sample.double().mean().item())
    assert res.nfe < 30
    if method == "multistep":
        assert torch.equal(res.nfe_per_sample, res.evaluated.sum(0))


def test_skipped_step_reuses_the_last_raw_output_converted_at_the_current_point():
    # DDIM with every step after warm-up skipped once: step 5 must use the eps of step 4
    steps = 6
    grid = S.timesteps(steps)
    res = sample(
        GM.model_fn(S),
        NOISE,
        S,
        OLD,
        steps=steps,
        solver="ddim",
        skip=AdaptiveSkip.official(threshold=1e9, max_skips=1),
    )
    assert res.evaluated[:, 0].tolist() == [True, True, True, True, False, True]
    x = NOISE
    fn = GM.model_fn(S)
    for i in range(steps):
        c_s, c_t = TimePoint.at(S, grid[i]), TimePoint.at(S, grid[i + 1])
        if i != 4:
            eps = fn(x, grid[i].expand(6))
        x0 = (x - c_s.sigma * eps) / c_s.alpha  # converted at the current (x, t)
        x = first_order_update(x, c_s, c_t, x0, data=True)
    assert torch.allclose(res.x, x, atol=1e-12)


def _official_batch_shared(noise, steps, threshold, max_skips):
    """An independent loop of the official criterion: DDIM, one d_k for the whole batch."""
    grid = S.timesteps(steps)
    fn = GM.model_fn(S)
    x, prev, diffs, streak, skip_next, flags, eps = noise, noise, [], 0, False, [], None
    for i in range(steps):
        c_s, c_t = TimePoint.at(S, grid[i]), TimePoint.at(S, grid[i + 1])
        if not skip_next:
            eps = fn(x, grid[i].expand(x.shape[0]))
            streak = 0
        else:
            streak += 1
        flags.append(not skip_next)
        x = c_t.alpha * (x - c_s.sigma * eps) / c_s.alpha + c_t.sigma * eps
        diffs.append((x - prev).abs().mean().item())
        prev = x
        k = i + 1
        skip_next = False
        if k >= 4:
            third = abs(diffs[-1] - 2 * diffs[-2] + diffs[-3])
            skip_next = third <= 2 * threshold * diffs[-2] and streak < max_skips
    return x, flags


def test_batch_shared_mode_makes_the_official_decisions():
    ref_x, ref_flags = _official_batch_shared(NOISE, 40, 0.05, 3)
    res = sample(
        GM.model_fn(S),
        NOISE,
        S,
        OLD,
        steps=40,
        solver="ddim",
        skip=AdaptiveSkip.official(threshold=0.05, max_skips=3, per_sample=False),
    )
    assert not all(ref_flags)
    assert res.evaluated[:, 0].tolist() == ref_flags
    assert bool((res.evaluated == res.evaluated[:, :1]).all())  # one path for the batch
    assert torch.allclose(res.x, ref_x, atol=1e-12)


def test_state_lives_in_one_call():
    skip = AdaptiveSkip.official(threshold=0.05)
    a = sample(GM.model_fn(S), NOISE, S, OLD, steps=25, skip=skip)
    b = sample(GM.model_fn(S), NOISE, S, OLD, steps=25, skip=skip)
    assert torch.equal(a.x, b.x) and torch.equal(a.evaluated, b.evaluated)


def test_per_sample_kwargs_are_sliced_with_the_evaluated_rows():
    seen = []

    def fn(x, t, y):
        assert y.shape[0] == x.shape[0]
        seen.append(y.clone())
        return GM.model_fn(S)(x, t) + 0.0 * y.reshape(-1, 1, 1, 1)

    y = torch.arange(6)
    sample(
        fn,
        NOISE,
        S,
        OLD,
        steps=30,
        model_kwargs={"y": y},
        skip=AdaptiveSkip.official(threshold=0.05, max_skips=3),
    )
    assert any(len(s) < 6 for s in seen)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="warmup"):
        AdaptiveSkip(warmup=2)
    with pytest.raises(
        ValueError, match="warmup"
    ):  # with 3, the latent test would read the initial noise
        AdaptiveSkip.official(warmup=3)
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveSkip(threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveSkip(threshold=-1)
    with pytest.raises(ValueError, match="adaptive"):
        sample(
            GM.model_fn(S),
            NOISE,
            S,
            OLD,
            solver="dpmsolver++",
            method="adaptive",
            skip=AdaptiveSkip(),
        )


def test_a_fixed_skip_pattern_is_replayed_exactly():
    from pdm.sampling import FixedSkip

    path = (True, True, False, True, False, False, True, True)
    res = sample(GM.model_fn(S), NOISE, S, OLD, steps=8, skip=FixedSkip(path))
    assert res.evaluated[:, 0].tolist() == list(path)
    assert res.nfe == sum(path)
    with pytest.raises(ValueError, match="first step"):
        FixedSkip((False, True))


def test_skipping_with_guidance_reuses_both_halves_and_calls_only_evaluated_rows():
    from pdm.sampling import classifier_free_guidance

    rows = []

    def net(x, t, y):
        rows.append(x.shape[0])
        return GM.model_fn(S)(x, t) * (1 + 0.01 * y.to(x.dtype).reshape(-1, 1, 1, 1))

    guided = classifier_free_guidance(net, scale=1.5, null_label=10)
    y = torch.arange(6)
    res = sample(
        guided,
        NOISE,
        S,
        OLD,
        steps=30,
        model_kwargs={"y": y},
        skip=AdaptiveSkip.official(threshold=0.05, max_skips=3),
    )
    assert sum(rows) == 2 * int(res.nfe_per_sample.sum())  # both halves, only for evaluated samples
    plain = sample(guided, NOISE, S, OLD, steps=30, model_kwargs={"y": y})
    assert res.nfe < plain.nfe == 30


def test_skipping_with_expert_routing_calls_each_expert_on_its_own_evaluated_rows():
    from pdm.sampling import expert_router

    calls = {"high": 0, "low": 0}

    def expert(name):
        def fn(x, t):
            labels = S.label(t)
            assert bool((labels >= 395.5).all()) if name == "high" else bool((labels < 395.5).all())
            calls[name] += x.shape[0]
            return GM.model_fn(S)(x, t)

        return fn

    res = sample(
        expert_router(expert("high"), expert("low"), S),
        NOISE,
        S,
        OLD,
        steps=40,
        skip=AdaptiveSkip.official(threshold=0.05, max_skips=3),
    )
    assert calls["high"] > 0 and calls["low"] > 0
    assert calls["high"] + calls["low"] == int(res.nfe_per_sample.sum())


def test_a_new_criterion_is_one_class(monkeypatch):
    # a criterion that lets every other sample skip, registered by name: the skipper adds the
    # warm-up and max_skips, the fill and the accounting, with nothing else to change
    from pdm.sampling.skipping import CRITERION_CLASSES, Criterion

    class EveryOther(Criterion):
        def may_skip(self, x, skipper, lam_next, weight_next):
            return torch.arange(skipper.batch) % 2 == 1

    monkeypatch.setitem(CRITERION_CLASSES, "every_other", EveryOther)
    skip = AdaptiveSkip(
        threshold=1.0,
        max_skips=1,
        warmup=4,
        criterion="every_other",
        fill="reuse",
        forecast_order=0,
    )
    res = sample(GM.model_fn(S), NOISE, S, OLD, steps=12, solver="dpmsolver++", order=2, skip=skip)
    odd, even = res.evaluated[:, 1::2], res.evaluated[:, 0::2]
    assert bool(even.all()) and bool(
        odd[:4].all()
    )  # even samples never skip; nobody during the warm-up
    assert (
        odd[4:].tolist() == [[False] * 3, [True] * 3] * 4
    )  # odd ones skip every other step (max_skips 1)
    with pytest.raises(ValueError, match="unknown skip criterion 'nope'"):
        AdaptiveSkip(criterion="nope")
