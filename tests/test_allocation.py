"""Rank allocation (eq. 15, paper 4.4, METHOD.md section 5)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from senslora.core.allocation import allocate_params, allocate_ranks, largest_remainder
from senslora.core.errors import SensloraError, SensloraWarning

# θ values: a few exact zeros and duplicates, otherwise spread over six decades.
theta_value = st.one_of(st.just(0.0), st.sampled_from([1.0, 2.5, 7.0]), st.floats(1e-3, 1e3))
thetas = st.lists(theta_value, min_size=1, max_size=25).filter(lambda t: any(t))
distinct_thetas = st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=25, unique=True)
scales = st.floats(-6, 6).map(lambda e: 10.0**e)


@st.composite
def problems(draw: st.DrawFn, theta_strategy: st.SearchStrategy = thetas) -> dict:
    """A feasible allocation problem: θ, budget and bounds (scalar or per-matrix r_max)."""
    theta = draw(theta_strategy)
    n = len(theta)
    r_min = draw(st.integers(0, 2))
    if draw(st.booleans()):
        r_max = draw(st.lists(st.integers(r_min, r_min + 20), min_size=n, max_size=n))
        cap = sum(r_max)
    else:
        r_max = draw(st.integers(r_min, r_min + 20))
        cap = r_max * n
    total = draw(st.integers(r_min * n, cap))
    return {"theta": theta, "total": total, "r_min": r_min, "r_max": np.array(r_max)}


def check(ranks: np.ndarray, p: dict) -> None:
    assert ranks.dtype.kind == "i"
    assert ranks.sum() == p["total"]
    assert (ranks >= p["r_min"]).all() and (ranks <= p["r_max"]).all()


@pytest.mark.parametrize("strategy", ["sra", "pra"])
@settings(max_examples=150, deadline=None)
@given(p=problems())
def test_budget_and_bounds(strategy: str, p: dict) -> None:
    ranks = allocate_ranks(p["theta"], p["total"], strategy=strategy, r_min=p["r_min"], r_max=p["r_max"])
    check(ranks, p)
    again = allocate_ranks(p["theta"], p["total"], strategy=strategy, r_min=p["r_min"], r_max=p["r_max"])
    np.testing.assert_array_equal(ranks, again)


@settings(max_examples=150, deadline=None)
@given(theta=thetas, avg=st.integers(1, 16), r_min=st.integers(0, 2), slack=st.integers(0, 30))
def test_sra_monotone_in_theta(theta: list[float], avg: int, r_min: int, slack: int) -> None:
    n = len(theta)
    r_max = max(avg, r_min) + slack
    total = n * max(avg, r_min)
    ranks = allocate_ranks(theta, total, r_min=r_min, r_max=r_max)
    t = np.array(theta)
    bigger = t[:, None] > t[None, :]
    assert (ranks[:, None] >= ranks[None, :])[bigger].all()


@pytest.mark.parametrize("strategy", ["sra", "pra"])
@settings(max_examples=100, deadline=None)
@given(p=problems(distinct_thetas), data=st.data())
def test_order_independent(strategy: str, p: dict, data: st.DataObject) -> None:
    perm = np.array(data.draw(st.permutations(range(len(p["theta"])))))
    theta = np.array(p["theta"])
    base = allocate_ranks(theta, p["total"], strategy=strategy, r_min=p["r_min"], r_max=p["r_max"])
    r_max = p["r_max"] if p["r_max"].ndim == 0 else p["r_max"][perm]
    permuted = allocate_ranks(theta[perm], p["total"], strategy=strategy, r_min=p["r_min"], r_max=r_max)
    np.testing.assert_array_equal(permuted, base[perm])


@pytest.mark.parametrize("strategy", ["sra", "pra"])
@settings(max_examples=150, deadline=None)
@given(p=problems(), scale=scales)
def test_scale_independent(strategy: str, p: dict, scale: float) -> None:
    kw = {"strategy": strategy, "r_min": p["r_min"], "r_max": p["r_max"]}
    base = allocate_ranks(p["theta"], p["total"], **kw)
    scaled = allocate_ranks(np.array(p["theta"]) * scale, p["total"], **kw)
    np.testing.assert_array_equal(scaled, base)


def test_sra_exact_proportions() -> None:
    np.testing.assert_array_equal(allocate_ranks([1, 2, 3, 4], 20), [2, 4, 6, 8])
    np.testing.assert_array_equal(allocate_ranks([1, 1, 2], 10), [3, 2, 5])  # 2.5, 2.5: earlier wins
    # remainders .4999999, .5000001: the larger remainder wins, which is also the larger θ
    np.testing.assert_array_equal(allocate_ranks([1, 1.000001, 2], 10), [2, 3, 5])
    np.testing.assert_array_equal(allocate_ranks([1.000001, 1, 2], 10), [3, 2, 5])


def test_clamping_redistributes() -> None:
    # Matrix 3 would get 13.3 of 16; it is capped at 8 and the other 8 split 1:2:3.
    np.testing.assert_array_equal(allocate_ranks([1, 2, 3, 100], 16, r_max=8), [1, 3, 4, 8])
    # Fixing the upper bounds first and the lower ones afterwards would overshoot the budget here:
    # the four tiny matrices need r_min = 1, which leaves 4 (2.05 + 1.95) for the two big ones.
    np.testing.assert_array_equal(
        allocate_ranks([2, 1.9, 1e-9, 1e-9, 1e-9, 1e-9], 8, r_max=3), [2, 2, 1, 1, 1, 1]
    )
    # A zero weight stays at r_min until the weighted matrices are all at r_max.
    np.testing.assert_array_equal(allocate_ranks([1, 0, 0], 12, r_max=4), [4, 4, 4])
    np.testing.assert_array_equal(allocate_ranks([1, 0, 0], 6, r_max=4), [4, 1, 1])
    np.testing.assert_array_equal(allocate_ranks([1, 0, 0], 6, r_min=0, r_max=10), [6, 0, 0])


def test_pra_paper_example() -> None:
    # Paper 4.4: 6 matrices, average rank 5, 3 categories -> 6, 6, 5, 5, 4, 4 in θ order.
    theta = np.array([0.3, 0.9, 0.1, 0.5, 0.7, 0.2])
    ranks = allocate_ranks(theta, 30, strategy="pra", categories=3)
    np.testing.assert_array_equal(ranks[np.argsort(-theta)], [6, 6, 5, 5, 4, 4])


def test_pra_uneven_categories() -> None:
    # 7 matrices in 3 categories of 3, 2, 2; quotas 5.86 x3, 4.86 x2, 3.86 x2; the 6 extra
    # ranks go to the largest θ.
    ranks = allocate_ranks([1, 2, 3, 4, 5, 6, 7], 35, strategy="pra")
    np.testing.assert_array_equal(ranks, [3, 4, 5, 5, 6, 6, 6])
    np.testing.assert_array_equal(allocate_ranks([3, 1, 2], 12, strategy="pra", categories=1), [4, 4, 4])


def test_all_zero_theta_is_uniform_with_warning() -> None:
    for strategy in ("sra", "pra"):
        with pytest.warns(SensloraWarning, match="falling back to uniform"):
            np.testing.assert_array_equal(allocate_ranks([0, 0, 0], 10, strategy=strategy), [4, 3, 3])
    with pytest.warns(UserWarning):
        np.testing.assert_array_equal(allocate_ranks([0, 0, 0], 12, r_max=np.array([1, 10, 10])), [1, 6, 5])
    with pytest.warns(UserWarning):
        np.testing.assert_array_equal(allocate_params([0, 0, 0], 4 * 1100, [300, 300, 500]), [4, 4, 4])


def test_largest_remainder() -> None:
    np.testing.assert_array_equal(largest_remainder(np.array([1.5, 1.5, 1.0]), 4), [2, 1, 1])
    np.testing.assert_array_equal(
        largest_remainder(np.array([1.5, 1.5, 1.0]), 4, np.array([0, 1, 0])), [1, 2, 1]
    )
    # last-bit noise on integral quotas doesn't move ranks around
    noisy = np.array([2.9999999999999996, 1.0000000000000002, 2.0])
    np.testing.assert_array_equal(largest_remainder(noisy, 6), [3, 1, 2])
    with pytest.raises(ValueError):
        largest_remainder(np.array([1.0, 1.0]), 5)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([1, 2, 3], 2), {}, "too small for r_min=1 on 3 matrices"),
        (([1, 2, 3], 31), {"r_max": 10}, "exceeds the 30"),
        (([1, -2, 3], 6), {}, "non-negative"),
        (([1, float("nan"), 3], 6), {}, "finite"),
        (([], 6), {}, "no target matrices"),
        (([1, 2, 3], 6), {"strategy": "xyz"}, "sra, pra"),
        (([1, 2, 3], 6), {"strategy": "pra", "categories": 0}, "category"),
        (([1, 2, 3], 6), {"r_min": -1}, "r_min"),
        (([1, 2, 3], 6), {"r_min": 2, "r_max": np.array([3, 1, 3])}, "r_max is below r_min"),
    ],
)
def test_allocate_ranks_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(SensloraError, match=match):
        allocate_ranks(*args, **kwargs)


# --- parameter budget mode ------------------------------------------------------------------------


@st.composite
def param_problems(draw: st.DrawFn) -> dict:
    theta = draw(thetas)
    n = len(theta)
    cost = draw(st.lists(st.integers(2, 64), min_size=n, max_size=n))
    r_min = draw(st.integers(0, 2))
    r_max = draw(st.one_of(st.none(), st.integers(r_min, r_min + 16)))
    budget = draw(st.integers(r_min * sum(cost), (r_min + 20) * sum(cost)))
    return {"theta": theta, "cost": np.array(cost), "budget": budget, "r_min": r_min, "r_max": r_max}


@settings(max_examples=200, deadline=None)
@given(p=param_problems(), scale=scales)
def test_params_within_budget_and_bounds(p: dict, scale: float) -> None:
    kw = {"r_min": p["r_min"], "r_max": p["r_max"]}
    ranks = allocate_params(p["theta"], p["budget"], p["cost"], **kw)
    spent = int(ranks @ p["cost"])
    assert spent <= p["budget"]
    assert (ranks >= p["r_min"]).all()
    hi = p["budget"] // p["cost"] if p["r_max"] is None else np.full(len(ranks), p["r_max"])
    assert (ranks <= hi).all()
    # flooring loses less than one rank per matrix, unless the caps bind
    assert spent > min(p["budget"], int(hi @ p["cost"])) - int(p["cost"].sum())
    np.testing.assert_array_equal(
        allocate_params(np.array(p["theta"]) * scale, p["budget"], p["cost"], **kw), ranks
    )


def test_params_example() -> None:
    # parameters 733, 1467, 2200 -> ranks 2.44, 4.89, 4.4 -> floors 2, 4, 4 use 3800 of 4400;
    # +1 to matrix 1 (remainder .89, cost 300), then matrix 0 (.44, 300) exhausts the budget.
    np.testing.assert_array_equal(allocate_params([1, 2, 3], 4400, [300, 300, 500]), [3, 5, 4])
    # equal θ means equal parameters: ranks 10 and 2.5; the leftover 200 can't buy matrix 1 a
    # rank, so it goes to matrix 0, next in largest-remainder order
    np.testing.assert_array_equal(allocate_params([1, 1], 2000, [100, 400]), [11, 2])
    # a budget beyond r_max everywhere gives r_max everywhere
    np.testing.assert_array_equal(allocate_params([1, 5], 10**6, [100, 400], r_max=8), [8, 8])


def test_params_errors() -> None:
    with pytest.raises(SensloraError, match="parameter budget of 100 is too small"):
        allocate_params([1, 2], 100, [100, 100])
    with pytest.raises(SensloraError, match="non-negative"):
        allocate_params([1, -2], 1000, [100, 100])
    with pytest.raises(SensloraError, match="r_max is below r_min"):
        allocate_params([1, 2], 1000, [100, 100], r_min=2, r_max=1)


def test_no_warning_for_positive_theta() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        allocate_ranks([0, 1, 2], 9)
        allocate_params([0, 1, 2], 900, [100, 100, 100])
