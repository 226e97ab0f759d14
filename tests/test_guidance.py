"""Classifier-free guidance, dynamic thresholding, expert routing and argument checks."""

import pytest
import torch

from pdm.sampling import (
    Settings,
    classifier_free_guidance,
    dynamic_threshold,
    expert_router,
    sample,
)
from pdm.schedule import VPSchedule

OLD = Settings(
    solver="dpmsolver++", order=2, grid="time_uniform"
)  # the sampler these tests were written for

S = VPSchedule.linear()


def test_cfg_is_one_batched_call_and_combines_linearly():
    calls = []

    def net(x, t, y):
        calls.append(x.shape[0])
        return x * 0 + y.to(x.dtype).reshape(-1, 1)  # output = the label

    guided = classifier_free_guidance(net, scale=1.5, null_label=10)
    out = guided(torch.zeros(3, 2), torch.ones(3), y=torch.tensor([1, 2, 3]))
    assert calls == [6]
    expected = 10 + 1.5 * (torch.tensor([1.0, 2.0, 3.0]) - 10)
    assert torch.allclose(out[:, 0], expected)


def test_dynamic_threshold_clamps_at_the_percentile_and_rescales():
    x0 = torch.linspace(-3, 3, 1001).reshape(1, -1)
    out = dynamic_threshold(x0, ratio=0.995, max_value=1.0)
    s = torch.quantile(x0.abs(), 0.995).item()
    assert out.abs().max().item() == pytest.approx(1.0)
    assert out[0, 500].item() == pytest.approx(0.0, abs=1e-7)
    assert out[0, 700].item() == pytest.approx(x0[0, 700].item() / s, rel=1e-6)
    small = torch.full((1, 10), 0.5)
    assert torch.equal(dynamic_threshold(small), small)  # s = max(s, 1) leaves in-range data alone


def test_expert_router_splits_at_step_396():
    high = lambda x, t: torch.ones_like(x)  # noqa: E731
    low = lambda x, t: -torch.ones_like(x)  # noqa: E731
    route = expert_router(high, low, S)
    labels = torch.tensor([0.0, 395.0, 396.0, 999.0, 395.4, 395.6])
    out = route(torch.zeros(6, 1), S.t_of_label(labels))
    assert out[:, 0].tolist() == [-1, -1, 1, 1, -1, 1]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(solver="euler"), "unknown solver"),
        (dict(method="heun"), "unknown method"),
        (dict(skip_type="karras"), "unknown grid"),
        (dict(prediction="score"), "unknown prediction"),
        (dict(order=4), "order must be 1, 2 or 3"),
        (dict(steps=2, order=3, method="singlestep_fixed"), "needs at least 3 steps"),
        (dict(solver_type="rk4"), "unknown solver_type"),
    ],
)
def test_bad_arguments_fail_with_a_message_naming_the_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        sample(lambda x, t: x, torch.zeros(1, 2), S, OLD, **kw)


def test_thresholded_sampling_stays_in_range():
    fn = lambda x, t: -3 * x  # noqa: E731  (a wild eps model whose x0 leaves [-1, 1])
    noise = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = sample(fn, noise, S, OLD, steps=10, thresholding=True, denoise_to_zero=True)
    assert res.x.abs().max().item() <= 1.0 + 1e-9
