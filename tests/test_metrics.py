"""Metrics (eq. 8-10) and their fusion (eq. 11-14)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from senslora.core.diagonal import Diagonal
from senslora.core.errors import SensloraError
from senslora.core.metrics import (
    FUSIONS,
    SCORES,
    MatrixScores,
    effective_rank,
    equal_weight,
    fuse,
    global_sensitivity,
    score_matrix,
    topk_sensitivity,
    variation_weight,
)


def dense(rows: list[list[float]]) -> Diagonal:
    v = torch.tensor(rows, dtype=torch.float32)
    return Diagonal(v, tuple(v.shape))


def compact(values: list[float], d_out: int) -> Diagonal:
    return Diagonal(torch.tensor(values, dtype=torch.float64), (d_out, len(values)), compact=True)


# --- closed forms -------------------------------------------------------------------------------


def test_dense_hand_example() -> None:
    d = dense([[4.0, 1.0], [2.0, 3.0]])  # λ = 4, 3, 2, 1; Σλ = 10
    assert global_sensitivity(d) == 10.0
    assert topk_sensitivity(d) == 3.5  # k = 2: (4 + 3) / 2
    assert topk_sensitivity(d, 0.25) == 4.0
    assert topk_sensitivity(d, 1.0) == 2.5
    # cumulative shares 0.4, 0.7, 0.9, 1.0
    assert effective_rank(d) == 3
    assert effective_rank(d, 0.4) == 1  # hit exactly
    assert effective_rank(d, 0.7) == 2  # hit exactly
    assert effective_rank(d, 0.71) == 3
    assert effective_rank(d, 0.9) == 3  # hit exactly
    assert effective_rank(d, 1.0) == 4


def test_compact_hand_example() -> None:
    d = compact([1.0, 3.0], d_out=3)  # λ = 3, 3, 3, 1, 1, 1; Σλ = 12
    assert global_sensitivity(d) == 12.0
    assert topk_sensitivity(d) == 3.0  # k = 3
    assert topk_sensitivity(d, 2 / 3) == 2.5  # k = 4, a partial group: (9 + 1) / 4
    assert topk_sensitivity(d, 0.1) == 3.0  # k = max(1, 0)
    assert effective_rank(d, 0.75) == 3  # 9 / 12 hit exactly
    assert effective_rank(d, 0.8) == 4  # needs 9.6: one entry of the second group
    assert effective_rank(d, 0.95) == 6  # needs 11.4: three entries of the second group
    assert effective_rank(d, 0.25) == 1  # 3 / 12 hit exactly inside the first group


def test_topk_odd_n_and_third() -> None:
    d = dense([[5.0, 4.0, 3.0, 2.0, 1.0]])
    assert topk_sensitivity(d) == 4.5  # k = floor(2.5) = 2
    d = compact([1.0, 2.0, 3.0], d_out=1)
    assert topk_sensitivity(d, 1 / 3) == 3.0  # k = N/3 = 1 despite 1/3 being inexact


def test_zero_diagonal() -> None:
    d = compact([0.0, 0.0, 0.0], d_out=4)
    assert score_matrix(d) == MatrixScores(0.0, 0.0, 0.0)


def test_zeros_after_threshold() -> None:
    d = dense([[0.0, 2.0, 0.0, 2.0]])
    assert effective_rank(d, 1.0) == 2
    assert topk_sensitivity(d, 0.75) == pytest.approx(4 / 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_entries_rejected(bad: float) -> None:
    with pytest.raises(SensloraError):
        score_matrix(dense([[1.0, bad]]))


@pytest.mark.parametrize(
    "kwargs", [{"topk_fraction": 0.0}, {"topk_fraction": 1.5}, {"alpha": 0.0}, {"alpha": 1.01}]
)
def test_bad_parameters_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(SensloraError):
        score_matrix(dense([[1.0, 2.0]]), **kwargs)


# --- compact versus dense, and against an exact reference -----------------------------------------

FRACTIONS = [0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
ALPHAS = [0.05, 0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0]


def reference(lam: list[float], fraction: float, alpha: float) -> tuple[Fraction, Fraction, int]:
    """Eq. 8-10 by brute force in exact rational arithmetic, with decimal fraction and alpha."""
    lam = sorted((Fraction(x) for x in lam), reverse=True)
    total = sum(lam)
    k = max(1, math.floor(Fraction(str(fraction)) * len(lam)))
    topk = sum(lam[:k]) / k
    if total == 0:
        return total, topk, 0
    running = Fraction(0)
    for j, x in enumerate(lam, start=1):
        running += x
        if running >= Fraction(str(alpha)) * total:
            return total, topk, j
    raise AssertionError("unreachable")


@settings(max_examples=150, deadline=None)
@given(
    d_out=st.integers(1, 5),
    values=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 7.0, 1e-3]), min_size=1, max_size=7),
    fraction=st.sampled_from(FRACTIONS),
    alpha=st.sampled_from(ALPHAS),
)
def test_compact_equals_dense_equals_reference(
    d_out: int, values: list[float], fraction: float, alpha: float
) -> None:
    c = compact(values, d_out)
    d = Diagonal(c.dense(), c.shape)
    got_c = score_matrix(c, fraction, alpha)
    assert score_matrix(d, fraction, alpha) == got_c  # bit-identical
    total, topk, eff = reference(d.values.reshape(-1).tolist(), fraction, alpha)
    assert got_c.s_global == pytest.approx(float(total), rel=1e-12)
    assert got_c.s_topk == pytest.approx(float(topk), rel=1e-12)
    assert got_c.s_eff == eff


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_subnormal=False), min_size=1, max_size=40), st.integers(1, 6))
def test_compact_equals_dense_random_floats(values: list[float], d_out: int) -> None:
    c = compact(values, d_out)
    for alpha in (0.3, 0.85, 1.0):
        assert score_matrix(c, 1 / 3, alpha) == score_matrix(Diagonal(c.dense(), c.shape), 1 / 3, alpha)


# --- fusion ---------------------------------------------------------------------------------------


def test_weight_rules() -> None:
    assert variation_weight([2.0, 2.0, 2.0]) == 0.0  # σ = 0
    assert variation_weight([0.1, 0.1, 0.1]) == 0.0  # σ = 0 exactly, whatever np.std rounds to
    assert variation_weight([-1.0, 1.0]) == 0.0  # μ = 0
    assert variation_weight([1.0, 3.0]) == pytest.approx(1.0 / 4.0)  # σ = 1 (ddof 0), μ = 2
    assert equal_weight([1.0, 3.0]) == 0.25
    assert equal_weight([0.0, 0.0]) == 0.0
    assert set(FUSIONS) == {"sigma-mu2", "equal"}


def numpy_fuse(g: np.ndarray, t: np.ndarray, e: np.ndarray, weigh) -> np.ndarray:
    """Direct transcription of eq. 11-14."""
    beta1, beta2 = weigh(t), weigh(e)
    local = beta1 * t + beta2 * e
    gamma1, gamma2 = weigh(g), weigh(local)
    return gamma1 * g + gamma2 * local


@pytest.mark.parametrize("seed", range(10))
def test_fuse_matches_equations(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 30))
    g, t = rng.lognormal(-10, 2, n), rng.lognormal(-12, 1, n)
    e = rng.integers(1, 5000, n).astype(float)
    scores = [MatrixScores(*row) for row in zip(g, t, e, strict=True)]
    sigma_mu2 = lambda x: np.std(x) / np.mean(x) ** 2  # noqa: E731
    equal = lambda x: 0.5 / np.mean(x)  # noqa: E731
    for fusion, weigh in (("sigma-mu2", sigma_mu2), ("equal", equal)):
        theta, w = fuse(scores, fusion)
        np.testing.assert_allclose(theta, numpy_fuse(g, t, e, weigh), rtol=1e-12)
        assert w["beta1"] == pytest.approx(weigh(t), rel=1e-12)
        assert w["gamma1"] == pytest.approx(weigh(g), rel=1e-12)


def test_fuse_modes_and_reported_weights() -> None:
    scores = [MatrixScores(1.0, 10.0, 3.0), MatrixScores(2.0, 30.0, 1.0), MatrixScores(6.0, 20.0, 2.0)]
    g, t, e = np.array([1.0, 2.0, 6.0]), np.array([10.0, 30.0, 20.0]), np.array([3.0, 1.0, 2.0])
    expected = {
        "global": g,
        "topk": t,
        "effective-rank": e,
        "local": variation_weight(t) * t + variation_weight(e) * e,
    }
    for score in SCORES:
        theta, w = fuse(scores, score=score)
        # every mode is θ = γ1·S_global + γ2·(β1·S_topk + β2·S_eff) with the reported weights
        np.testing.assert_allclose(theta, w["gamma1"] * g + w["gamma2"] * (w["beta1"] * t + w["beta2"] * e))
        if score in expected:
            np.testing.assert_allclose(theta, expected[score])
    assert fuse(scores, score="global")[1] == {"beta1": 0.0, "beta2": 0.0, "gamma1": 1.0, "gamma2": 0.0}
    assert fuse(scores, score="topk")[1] == {"beta1": 1.0, "beta2": 0.0, "gamma1": 0.0, "gamma2": 1.0}


def test_fuse_constant_metric_gets_zero_weight() -> None:
    scores = [MatrixScores(1.0, 5.0, 2.0), MatrixScores(3.0, 5.0, 2.0)]
    theta, w = fuse(scores)
    assert w["beta1"] == w["beta2"] == 0.0 and w["gamma2"] == 0.0
    np.testing.assert_allclose(theta, w["gamma1"] * np.array([1.0, 3.0]))


def test_fuse_errors_name_the_options() -> None:
    scores = [MatrixScores(1.0, 1.0, 1.0)]
    with pytest.raises(SensloraError, match="sigma-mu2, equal"):
        fuse(scores, fusion="nope")
    with pytest.raises(SensloraError, match="fused, global, local, topk, effective-rank"):
        fuse(scores, score="nope")
    with pytest.raises(SensloraError):
        fuse([])
