"""What repeats over seeds support: Student-t intervals of a mean, Welch's test of a difference,
and Holm's correction over the pairs compared.

Why these: an ablation has few seeds per setting (3-5), so the mean's interval needs Student's t
rather than a normal quantile; the settings' seed spreads differ (a cheap P varies more than a
costly one), so the difference of two means is tested without assuming equal variances (Welch);
and a report that compares every pair of settings makes several tests at once, so the p-values
are adjusted by Holm's step-down method, which holds the chance of any false claim at the level
without assuming the tests independent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _st


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t interval of the mean; half-width nan for one value."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    half = _st.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Welch's test of mean(a) - mean(b): the difference, its interval at ``level`` (with the
    Welch-Satterthwaite degrees of freedom) and the two-sided p-value. nan with fewer than two
    values on a side, or where neither side varies."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    nan = {"difference": diff, "low": math.nan, "high": math.nan, "p": math.nan, "dof": math.nan}
    if a.size < 2 or b.size < 2:
        return nan
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return nan
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = _st.t.ppf(0.5 + level / 2, dof) * se
    p = 2 * _st.t.sf(abs(diff) / se, dof)
    return {
        "difference": diff,
        "low": float(diff - half),
        "high": float(diff + half),
        "p": float(p),
        "dof": float(dof),
    }


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (nan stays nan and is not counted)."""
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(p.shape, math.nan)
    order = ok[np.argsort(p[ok])]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
