"""The statistics of repeats (pdm.ablation.stats) on known samples and against scipy's tests, and
the report's claims: only the differences the intervals support."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pdm.ablation.report import differences, part_points, summarise
from pdm.ablation.stats import holm, t_interval, welch


def test_t_interval_on_known_samples():
    mean, half = t_interval([1.0, 2.0, 3.0])
    # sd 1, n 3: t(0.975, 2) = 4.302653 (tables), half-width 4.302653 / sqrt(3)
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    mean, half = t_interval([5.0, 5.0, 5.0, 5.0])
    assert mean == 5.0 and half == 0.0
    assert math.isnan(t_interval([2.5])[1]) and t_interval([2.5])[0] == 2.5
    _, wide = t_interval([1.0, 2.0, 3.0], level=0.99)
    assert wide == pytest.approx(9.924843 / math.sqrt(3), rel=1e-6)


def test_welch_agrees_with_scipy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.normal(0, 1, 3), rng.normal(0.5, 3, 4)
        mine, ref = welch(a, b), stats.ttest_ind(a, b, equal_var=False)
        assert mine["p"] == pytest.approx(ref.pvalue, rel=1e-10)
        ci = ref.confidence_interval(0.95)
        assert (mine["low"], mine["high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert math.isnan(welch([1.0], [2.0, 3.0])["p"])


def test_holm_adjusts_step_down():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, 0.001]) == pytest.approx([0.2, 0.002])
    out = holm([float("nan"), 0.02])
    assert math.isnan(out[0]) and out[1] == pytest.approx(0.02)


def _rows(scores: dict[str, list[float]]) -> dict[str, dict]:
    rows = {}
    for value, got in scores.items():
        for seed, score in enumerate(got):
            label = value if seed == 0 else f"{value}/seed{seed}"
            rows[label] = {
                "value": value,
                "seed": seed,
                "steps": 10,
                "train_flops": 1.0,
                "final": score,
                "best": score,
                "bits_per_dim": score,
            }
    return rows


def test_the_report_claims_only_what_the_intervals_support():
    rows = _rows({"1": [1.00, 1.02, 0.98], "2": [2.0, 2.02, 1.98], "4": [1.01, 0.97, 1.05]})
    summary = summarise(rows, ["1", "2", "4"])
    assert summary["1"]["final"]["mean"] == pytest.approx(1.0)
    assert summary["1"]["final"]["half_width"] == pytest.approx(
        4.302653 * 0.02 / math.sqrt(3), rel=1e-5
    )
    tests = {(t["a"], t["b"]): t for t in differences(rows, ["1", "2", "4"])["final"]}
    assert tests[("1", "2")]["supported"] and tests[("2", "4")]["supported"]
    assert not tests[("1", "4")]["supported"]  # within the seeds' spread
    # a ratio of geometric means, tested on the logarithms (the scores' spread grows with them)
    logs = [np.log([1.00, 1.02, 0.98]), np.log([2.0, 2.02, 1.98])]
    ref = stats.ttest_ind(*logs, equal_var=False)
    assert tests[("1", "2")]["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert tests[("1", "2")]["ratio"] == pytest.approx(np.exp(logs[0].mean() - logs[1].mean()))
    assert (
        tests[("1", "2")]["ratio_low"]
        < tests[("1", "2")]["ratio"]
        < tests[("1", "2")]["ratio_high"]
        < 1
    )
    # a spread that grows with the score: a difference the raw scale cannot see, the ratio can
    wide = _rows({"1": [3.6, 6.4, 7.2], "8": [0.0414, 0.0418, 0.0455]})
    assert differences(wide, ["1", "8"])["final"][0]["supported"]
    # one seed each: nothing can be claimed
    single = differences(_rows({"1": [1.0], "2": [5.0]}), ["1", "2"])["final"]
    assert not single[0]["supported"] and math.isnan(single[0]["p"])


def test_curves_part_where_every_bin_above_is_worse():
    edges = list(np.linspace(-10, 10, 6))
    base = np.array([1.0, 0.8, 0.5, 0.2, 0.05])
    held, rows = {}, {}
    jitter = [0.0, 0.004, -0.004]
    for value, factor in (("1", [1, 1, 1, 1, 1]), ("8", [1, 1, 1, 1.6, 2.0])):
        for seed, j in enumerate(jitter):
            label = value if seed == 0 else f"{value}/seed{seed}"
            held[label] = {"log_snr_edges": edges, "rmse": list(base * factor * (1 + j))}
            rows[label] = {"value": value}
    part = part_points(held, rows, ["1", "8"])["8"]
    assert part["above_log_snr"] == pytest.approx(edges[3])
    assert part["worse_bins"] == pytest.approx([4.0, 8.0])  # the bins' centres
    assert part["better_bins"] == []
