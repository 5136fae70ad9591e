"""Integer LoRA ranks from allocation weights θ under a budget (METHOD.md section 5).

Real-valued quotas (SRA, eq. 15, or PRA, paper section 4.4) are clamped to ``[r_min, r_max]``
with the surplus redistributed among the unclamped matrices, then rounded by the largest-remainder
method so the budget is met exactly (rank mode) or never exceeded (parameter mode). Results depend
only on θ up to a positive factor and follow the matrices under reordering; remaining ties go to
the larger θ, then to the earlier matrix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from .errors import SensloraError, SensloraWarning

STRATEGIES = ("sra", "pra")

# Quotas are rounded to this many significant bits (about 12 decimal digits) before flooring and
# ranking remainders, so the last-bit noise from rescaling θ cannot change the result.
_KEEP_BITS = 40


def _round_significant(x: np.ndarray) -> np.ndarray:
    mant, exp = np.frexp(x)
    return np.ldexp(np.round(np.ldexp(mant, _KEEP_BITS)), exp - _KEEP_BITS)


def _floors_and_order(quotas: np.ndarray, priority: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Floors of the quotas and the largest-remainder order: remainder, then priority, both
    descending, then index ascending."""
    q = _round_significant(np.asarray(quotas, dtype=np.float64))
    floors = np.floor(q).astype(np.int64)
    # np.lexsort sorts by its last key first.
    order = np.lexsort((np.arange(q.size), -priority, -(q - floors)))
    return floors, order


def largest_remainder(quotas: np.ndarray, total: int, priority: np.ndarray | None = None) -> np.ndarray:
    """Integers summing to ``total``: floor every quota, then +1 to the largest remainders.

    ``quotas`` must sum to ``total`` (up to float error). Remainders are compared after rounding
    the quotas to ~12 significant digits; ties go to the larger ``priority`` (pass θ), then to the
    smaller index.
    """
    q = np.asarray(quotas, dtype=np.float64)
    prio = np.zeros(q.size) if priority is None else np.asarray(priority, dtype=np.float64)
    floors, order = _floors_and_order(q, prio)
    short = total - int(floors.sum())
    if not 0 <= short <= q.size:
        raise ValueError(f"quotas sum to {q.sum()}, which does not round to total={total}")
    floors[order[:short]] += 1
    return floors


def _fill(offset: np.ndarray, slope: np.ndarray, total: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """q_w = clip(offset_w + t·slope_w, lo_w, hi_w) with the level t at which Σ_w q_w = total.

    This is the fixed point of "clamp to the bounds and redistribute the surplus among the
    unclamped matrices" (proportionally to ``slope``), solved exactly over the breakpoints of the
    piecewise-linear Σq(t). Needs slope ≥ 0, some slope > 0 and Σq(-∞) ≤ total ≤ Σq(+∞).
    """
    moving = slope > 0
    enter = (lo - offset)[moving] / slope[moving]  # t at which a matrix leaves its lower bound
    leave = (hi - offset)[moving] / slope[moving]  # t at which it reaches its upper bound
    breaks = np.unique(np.concatenate([enter, leave]))
    # Σq at every breakpoint; each row is sorted before summing so matrix order can't change it.
    sums = np.sort(np.clip(offset + np.outer(breaks, slope), lo, hi), axis=1).sum(axis=1)
    i = min(int(np.searchsorted(sums, total)), breaks.size - 1)
    # On (breaks[i-1], breaks[i]] every matrix is at a bound or free, and Σq crosses total there.
    below = breaks[i - 1] if i > 0 else -np.inf
    at_hi, at_lo = np.zeros_like(moving), np.zeros_like(moving)
    at_hi[moving] = leave <= below
    at_lo[moving] = enter >= breaks[i]
    free = moving & ~at_hi & ~at_lo
    q = np.clip(offset, lo, hi).astype(np.float64)
    q[at_hi], q[at_lo] = hi[at_hi], lo[at_lo]
    if free.any():
        t = (total - math.fsum(q[~free]) - math.fsum(offset[free])) / math.fsum(slope[free])
        q[free] = offset[free] + t * slope[free]
    return np.clip(q, lo, hi)


def _proportional(
    theta: np.ndarray, total: float, lo: np.ndarray, hi: np.ndarray, even: np.ndarray
) -> np.ndarray:
    """Quotas proportional to θ within [lo, hi] summing to ``total`` (eq. 15 with clamping).

    Zero-weight matrices stay at ``lo`` unless every weighted matrix is saturated at ``hi``; then
    they share the rest in proportion to ``even`` (equal ranks).
    """
    pos = theta > 0
    saturated = math.fsum(hi[pos])
    if total > saturated + math.fsum(lo[~pos]):
        q = hi.astype(np.float64)
        q[~pos] = _fill(np.zeros(int((~pos).sum())), even[~pos], total - saturated, lo[~pos], hi[~pos])
        return q
    return _fill(np.zeros(theta.size), theta, total, lo, hi)


def _pra_offsets(theta: np.ndarray, categories: int) -> np.ndarray:
    """Per-matrix rank offsets of PRA (paper 4.4): (C-1)/2 - c for the c-th category by θ."""
    n = theta.size
    by_theta = np.argsort(-theta, kind="stable")  # θ descending, ties by module order
    # Categories of near-equal size; the first n % C categories get one extra matrix.
    sizes = [n // categories + (c < n % categories) for c in range(categories)]
    offsets = np.empty(n)
    offsets[by_theta] = (categories - 1) / 2 - np.repeat(np.arange(categories), sizes)
    return offsets


def _check_theta(theta: Sequence[float] | np.ndarray) -> np.ndarray:
    t = np.asarray(theta, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise SensloraError("no target matrices to allocate ranks to")
    if not np.isfinite(t).all() or (t < 0).any():
        raise SensloraError(
            "allocation weights must be finite and non-negative; check the sensitivity scores"
        )
    return t


def _warn_uniform() -> None:
    warnings.warn("all allocation weights are 0; falling back to uniform ranks", SensloraWarning, stacklevel=3)


def _upper_bounds(
    n: int, r_min: int, r_max: int | np.ndarray | None, default: int | np.ndarray
) -> np.ndarray:
    hi = np.broadcast_to(np.asarray(default if r_max is None else r_max, dtype=np.int64), (n,)).copy()
    if (hi < r_min).any():
        raise SensloraError(f"r_max is below r_min={r_min} for some matrix; lower --r-min")
    return hi


def allocate_ranks(
    theta: Sequence[float] | np.ndarray,
    total: int,
    *,
    strategy: str = "sra",
    r_min: int = 1,
    r_max: int | np.ndarray | None = None,
    categories: int = 3,
) -> np.ndarray:
    """Integer ranks with Σ r_w = ``total`` exactly and r_min ≤ r_w ≤ r_max.

    "sra": quota_w = θ_w / Σθ · total (eq. 15). "pra" (paper 4.4): matrices sorted by θ are cut
    into ``categories`` near-equal groups whose quotas step down by 1 around the average. Both are
    clamped with redistribution, then rounded by :func:`largest_remainder`. ``r_max`` is an int, a
    per-matrix array (the caller passes min(d_in, d_out)) or None for no cap. All-zero θ gives
    uniform ranks with a warning.
    """
    t = _check_theta(theta)
    n = t.size
    if strategy not in STRATEGIES:
        raise SensloraError(
            f"unknown allocation strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}"
        )
    if categories < 1:
        raise SensloraError(f"PRA needs at least 1 category, got {categories}")
    if r_min < 0:
        raise SensloraError(f"r_min must be >= 0, got {r_min}")
    if total < r_min * n:
        raise SensloraError(
            f"budget of {total} ranks is too small for r_min={r_min} on {n} matrices; "
            "raise --avg-rank or lower --r-min"
        )
    hi = _upper_bounds(n, r_min, r_max, total)
    if total > hi.sum():
        raise SensloraError(
            f"budget of {total} ranks exceeds the {hi.sum()} that r_max allows on {n} matrices; "
            "lower --avg-rank or raise --r-max"
        )
    lo, hi_f, ones = np.full(n, float(r_min)), hi.astype(np.float64), np.ones(n)
    if not t.any():
        _warn_uniform()
        quotas = _fill(np.zeros(n), ones, total, lo, hi_f)
    elif strategy == "sra":
        quotas = _proportional(t, total, lo, hi_f, ones)
    else:
        # The level t found by _fill is the average rank, shifted so that the quotas sum to total.
        quotas = _fill(_pra_offsets(t, categories), ones, total, lo, hi_f)
    return largest_remainder(quotas, total, priority=t)


def allocate_params(
    theta: Sequence[float] | np.ndarray,
    param_budget: int,
    cost_per_rank: Sequence[int] | np.ndarray,
    *,
    r_min: int = 1,
    r_max: int | np.ndarray | None = None,
) -> np.ndarray:
    """Integer ranks with Σ r_w·cost_w ≤ ``param_budget`` (cost_w = d_in + d_out) and bounds kept.

    Parameter-budget variant of eq. 15: each matrix gets parameters θ_w / Σθ · budget, i.e.
    r*_w = θ_w / Σθ · budget / cost_w, clamped with redistribution; after flooring, +1 ranks go out
    in largest-remainder order to every matrix that still fits in the budget. A budget beyond
    every matrix at r_max just gives r_max everywhere. All-zero θ gives equal ranks with a warning.
    """
    t = _check_theta(theta)
    n = t.size
    cost = np.asarray(cost_per_rank, dtype=np.int64).reshape(-1)
    if cost.shape != (n,) or (cost <= 0).any():
        raise ValueError(f"cost_per_rank must hold {n} positive integers, got {cost_per_rank!r}")
    if r_min < 0:
        raise SensloraError(f"r_min must be >= 0, got {r_min}")
    need = r_min * int(cost.sum())
    if param_budget < need:
        raise SensloraError(
            f"parameter budget of {param_budget} is too small for r_min={r_min} on {n} matrices "
            f"(needs {need}); raise --avg-rank or lower --r-min"
        )
    hi = _upper_bounds(n, r_min, r_max, param_budget // cost)
    spend = min(param_budget, int(hi @ cost))
    weights = t
    if not t.any():
        _warn_uniform()
        weights = cost.astype(np.float64)  # parameters proportional to cost = equal ranks
    cost_f = cost.astype(np.float64)
    params = _proportional(weights, spend, r_min * cost_f, hi * cost_f, cost_f)
    ranks, order = _floors_and_order(params / cost_f, t)
    left = param_budget - int(ranks @ cost)
    for w in order:
        if ranks[w] < hi[w] and cost[w] <= left:
            ranks[w] += 1
            left -= int(cost[w])
    return ranks
