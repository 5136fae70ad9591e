"""Statistics of paired benchmark runs (pure functions of lists of numbers, SciPy for the t and
normal quantiles): mean and spread, the paired t-interval, the smallest detectable effect and the
number of seeds that reach an interval half-width."""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% t-interval (SciPy's t quantile)."""
    from scipy import stats

    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def detectable_effect(sd: float, n: int, *, power: float = 0.8) -> float:
    """Smallest true paired difference a two-sided 5% paired t-test on ``n`` pairs detects with
    probability ``power``, for a difference standard deviation ``sd`` (SciPy's noncentral t).

    Hand-written (a one-line root find): no maintained offline package here exposes paired-t power."""
    from scipy import optimize, stats

    if n < 2 or sd <= 0:
        return math.nan
    df, se = n - 1, sd / math.sqrt(n)
    crit = stats.t.ppf(0.975, df)

    def shortfall(effect: float) -> float:
        nc = effect / se
        p = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
        # SciPy's nct returns nan far in the tail, where the power is 1 to machine precision
        return (1.0 if math.isnan(p) else p) - power

    hi = se * (crit + 1)
    while shortfall(hi) < 0:  # power rises with the effect: widen the bracket until it passes
        hi *= 2
    return float(optimize.brentq(shortfall, 0.0, hi))


def seeds_for_half_width(sd: float, half_width: float, *, at_least: int = 2) -> int:
    """Fewest pairs whose 95% t-interval of the mean difference has half-width <= ``half_width``."""
    from scipy import stats

    if sd <= 0:
        return at_least
    n = max(at_least, 2)
    while stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
    return n


def one_sided_lower(diffs: list[float], *, level: float = 0.95) -> float:
    """The one-sided ``level`` lower confidence bound of the mean of paired differences (SciPy's t
    quantile); nan for fewer than two pairs. A non-inferiority test at margin M passes when it is > -M."""
    from scipy import stats

    if len(diffs) < 2:
        return math.nan
    return statistics.fmean(diffs) - stats.t.ppf(level, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
