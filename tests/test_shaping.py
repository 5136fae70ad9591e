"""Robust shaping of allocation weights (temperature, role normalisation, rank cap) and the
concentration figures: property tests on the math, then through allocate()."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from senslora.core.allocation import allocate_params, allocate_ranks
from senslora.core.errors import SensloraError
from senslora.core.shaping import (
    concentration,
    concentration_warning,
    gini,
    normalize_by_role,
    rank_cap,
    role_of,
    temper,
)

thetas = st.lists(st.floats(1e-6, 1e6, allow_nan=False), min_size=2, max_size=30).map(np.array)
taus = st.floats(0.05, 1.0)


@given(thetas, taus, st.floats(1e-3, 1e3))
def test_temper_is_scale_equivariant_and_keeps_the_order(theta, tau, c):
    t = temper(theta, tau)
    np.testing.assert_allclose(temper(c * theta, tau), c**tau * t, rtol=1e-9)
    order = np.argsort(theta, kind="stable")
    assert (np.diff(t[order]) >= 0).all()


@given(thetas, taus)
def test_a_lower_temperature_never_widens_the_spread(theta, tau):
    spread = lambda x: x.max() / x.min()  # noqa: E731
    assert spread(temper(theta, tau)) <= spread(theta) * (1 + 1e-9)


@pytest.mark.parametrize("tau", [0, -0.5, 1.5, math.nan])
def test_temperature_out_of_range_is_a_user_error(tau):
    with pytest.raises(SensloraError, match="temperature"):
        temper(np.ones(3), tau)


def test_role_strips_the_block_index():
    assert role_of("model.layers.3.self_attn.q_proj") == "model.layers.self_attn.q_proj"
    assert role_of("bert.encoder.layer.11.output.dense") == "bert.encoder.layer.output.dense"
    assert role_of("model.layers.3.mlp.down_proj") != role_of("model.layers.3.mlp.up_proj")


NAMES = [f"model.layers.{i}.{r}" for i in range(4) for r in ("q_proj", "down_proj")]


@given(st.lists(st.floats(1e-3, 1e3), min_size=8, max_size=8).map(np.array), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_role_normalisation_is_invariant_to_rescaling_one_role(theta, c_all, c_down):
    out = normalize_by_role(theta, NAMES)
    scaled = theta * c_all
    scaled[1::2] *= c_down  # every down_proj
    np.testing.assert_allclose(normalize_by_role(scaled, NAMES), out, rtol=1e-9)
    # Each role keeps a mean of 1: its uniform share of the budget.
    np.testing.assert_allclose([out[0::2].mean(), out[1::2].mean()], [1.0, 1.0])


def test_a_role_with_no_weight_keeps_its_uniform_share():
    theta = np.array([0, 5, 0, 1, 0, 2, 0, 4], dtype=float)
    np.testing.assert_array_equal(normalize_by_role(theta, NAMES)[0::2], np.ones(4))


@given(st.floats(0.5, 64), st.floats(1, 10))
def test_rank_cap_is_reachable_and_relative_to_the_average(avg, rho):
    cap = rank_cap(avg, rho)
    assert cap >= math.ceil(avg)
    assert cap <= max(math.ceil(avg), rho * avg * (1 + 1e-9))


@pytest.mark.parametrize("rho", [0.5, -1, math.inf])
def test_rho_out_of_range_is_a_user_error(rho):
    with pytest.raises(SensloraError, match="rho"):
        rank_cap(4, rho)


def test_no_cap_without_rho():
    assert rank_cap(4, None) is None and rank_cap(4, 0) is None


@settings(deadline=None)
@given(thetas, st.integers(1, 8), st.floats(1, 4))
def test_capped_allocation_meets_the_budget_and_the_cap(theta, avg, rho):
    n = theta.size
    cap = rank_cap(avg, rho)
    ranks = allocate_ranks(theta, avg * n, r_max=cap)
    assert ranks.sum() == avg * n
    assert ranks.max() <= cap and ranks.min() >= 1
    costs = np.full(n, 10)
    p = allocate_params(theta, avg * n * 10, costs, r_max=cap)
    assert (p * costs).sum() <= avg * n * 10 and p.max() <= cap


@given(st.lists(st.integers(0, 100), min_size=1, max_size=50))
def test_gini_bounds(values):
    g = gini(values)
    assert 0 <= g <= 1 - 1 / len(values) + 1e-12


def test_gini_of_known_distributions():
    assert gini([3, 3, 3, 3]) == 0
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)


def test_concentration_figures():
    ranks = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 21]
    params = [r * 10 for r in ranks]
    c = concentration(ranks, params, r_min=1, r_max=[21] * 20)
    assert c["top_matrix_share"] == pytest.approx(210 / 400)
    assert c["top5pct_matrices"] == 1 and c["top5pct_share"] == c["top_matrix_share"]
    assert c["at_r_min"] == 19 and c["at_r_max"] == 1
    assert c["max_rank_over_avg"] == pytest.approx(21 / 2)
    assert c["median_rank"] == 1


def test_concentration_warning_only_for_a_dominant_matrix():
    names = [f"m{i}" for i in range(20)]
    uniform = [40.0] * 20
    assert concentration_warning(names, [40] * 20, uniform) is None
    note = concentration_warning(names, [10] * 19 + [400], uniform)
    assert note.startswith("m19 takes 68% of the LoRA parameters") and "--rho" in note
    # Four matrices: 25% each is their uniform share, not a concentration.
    assert concentration_warning(names[:4], [40] * 4, uniform[:4]) is None
