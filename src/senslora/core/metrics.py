"""Per-matrix sensitivity metrics and their fusion into allocation weights (METHOD.md section 4).

Every metric is computed exactly on the (distinct value, multiplicity) form of a
:class:`~senslora.core.diagonal.Diagonal`, so a compact activation diagonal (``d_in`` values, each
repeated ``d_out`` times) is never expanded. λ denotes the ``N = d_out * d_in`` diagonal entries
sorted in non-increasing order, as in the paper (section 3.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .diagonal import Diagonal
from .errors import SensloraError

# Relative slack on cumulative-energy and k = fraction * N comparisons, so that a threshold hit
# exactly in real arithmetic is not missed by float rounding.
_REL_TOL = 1e-12


def _groups(d: Diagonal) -> tuple[np.ndarray, np.ndarray]:
    """Distinct diagonal values in descending order and how often each occurs in the full diagonal.

    Equal values are merged, so a compact diagonal and its dense expansion yield identical arrays
    (and therefore bit-identical metrics).
    """
    # Equivalent to ``d.values_and_counts()`` without its N-sized float64 copy and counts array:
    # every stored value has the same multiplicity (1, or d_out if compact), so merging equal
    # values only needs a sort. Sorting and comparing in the stored precision gives the same
    # distinct values in the same order as in float64 (widening is exact and monotone); only
    # the distinct values are widened.
    stored = d.values.detach().reshape(-1).cpu()
    v = np.sort((stored if stored.dtype == torch.float64 else stored.float()).numpy())
    mult = d.shape[0] if d.compact else 1
    if v.size == 0:
        raise SensloraError(f"weight matrix of shape {d.shape} has no entries to score")
    # NaN sorts last, inf last among the rest: the ends of the sorted values tell both checks.
    if not (np.isfinite(v[-1]) and np.isfinite(v[0])):
        raise SensloraError("Hessian diagonal has NaN/inf entries; check the calibration data and model")
    if v[0] < 0:
        raise SensloraError("Hessian diagonal has negative entries; clamp them at 0 before scoring")
    # The distinct values (as np.unique returns them) and how often each occurs.
    starts = np.flatnonzero(np.concatenate(([True], v[1:] != v[:-1])))
    uniq = v[starts].astype(np.float64)
    counts = np.diff(np.append(starts, v.size)) * mult
    return uniq[::-1], counts[::-1]


def _check_unit(name: str, x: float) -> None:
    if not 0 < x <= 1:
        raise SensloraError(f"{name} must be in (0, 1], got {x}")


def _topk(v: np.ndarray, c: np.ndarray, fraction: float) -> float:
    n = int(c.sum())
    # The slack keeps e.g. fraction = 1/3 on N = 3m at k = m despite 1/3 being inexact in binary.
    k = min(n, max(1, math.floor(fraction * n * (1 + _REL_TOL))))
    cum = np.cumsum(c)
    # Group i is the last one needed: whole groups before it, then k - cum[i-1] of its entries.
    i = int(np.searchsorted(cum, k, side="left"))
    taken = int(cum[i - 1]) if i > 0 else 0
    return float((np.dot(v[:i], c[:i]) + v[i] * (k - taken)) / k)


def _effective_rank(v: np.ndarray, c: np.ndarray, alpha: float) -> int:
    energy = np.cumsum(v * c)
    total = float(energy[-1])
    if total == 0:
        return 0
    target = alpha * total - _REL_TOL * total
    # First group whose cumulative energy reaches the target; only part of it may be needed.
    i = int(np.searchsorted(energy, target, side="left"))
    before_energy = float(energy[i - 1]) if i > 0 else 0.0
    needed = math.ceil((target - before_energy) / v[i])
    # In exact arithmetic 1 <= needed <= c[i]; clip so float rounding can't leave the group.
    return int(c[:i].sum()) + min(max(needed, 1), int(c[i]))


def global_sensitivity(d: Diagonal) -> float:
    """S_global = tr(H) = Σ_i λ_i (eq. 8)."""
    v, c = _groups(d)
    return float(np.dot(v, c))


def topk_sensitivity(d: Diagonal, fraction: float = 0.5) -> float:
    """S_topk = (1/k) Σ_{i≤k} λ_i with k = max(1, floor(fraction · N)) (eq. 9)."""
    _check_unit("top-k fraction", fraction)
    return _topk(*_groups(d), fraction)


def effective_rank(d: Diagonal, alpha: float = 0.85) -> int:
    """S_eff = min{k : Σ_{j≤k} λ_j / Σ_j λ_j ≥ α} (eq. 10); 0 for an all-zero diagonal."""
    _check_unit("effective-rank alpha", alpha)
    return _effective_rank(*_groups(d), alpha)


@dataclass
class MatrixScores:
    """The three per-matrix metrics of section 3.2."""

    s_global: float
    s_topk: float
    s_eff: float


def score_matrix(d: Diagonal, topk_fraction: float = 0.5, alpha: float = 0.85) -> MatrixScores:
    """Global (eq. 8), Top-k (eq. 9) and Effective Rank (eq. 10) of one matrix."""
    _check_unit("top-k fraction", topk_fraction)
    _check_unit("effective-rank alpha", alpha)
    v, c = _groups(d)  # sorted once for all three metrics
    return MatrixScores(
        s_global=float(np.dot(v, c)),
        s_topk=_topk(v, c, topk_fraction),
        s_eff=float(_effective_rank(v, c, alpha)),
    )


def variation_weight(x: Sequence[float] | np.ndarray) -> float:
    """σ/μ² of a metric across matrices (eq. 11, 13); σ is the population std; 0 if μ = 0 or σ = 0."""
    a = np.asarray(x, dtype=np.float64)
    mu = float(a.mean())
    # An exactly constant metric has σ = 0; test equality rather than trust np.std's rounding.
    if mu == 0 or (a == a[0]).all():
        return 0.0
    return float(a.std()) / mu**2


def equal_weight(x: Sequence[float] | np.ndarray) -> float:
    """0.5/μ, the equal-weight ablation of the paper's Table 4; 0 if μ = 0."""
    mu = float(np.asarray(x, dtype=np.float64).mean())
    return 0.0 if mu == 0 else 0.5 / mu


FUSIONS: dict[str, Callable[[Sequence[float] | np.ndarray], float]] = {
    "sigma-mu2": variation_weight,
    "equal": equal_weight,
}

SCORES = ("fused", "global", "local", "topk", "effective-rank")


def fuse(
    scores: Sequence[MatrixScores], fusion: str = "sigma-mu2", score: str = "fused"
) -> tuple[np.ndarray, dict[str, float]]:
    """Allocation weights θ per matrix (eq. 11-14) and the weights β1, β2, γ1, γ2 used.

    θ = γ1·S_global + γ2·(β1·S_topk + β2·S_eff) in every mode; ``score`` picks the ablation
    (Table 3, Figure 3): "fused" computes all four weights with ``fusion``, "global" sets
    γ = (1, 0), "local" computes β and sets γ = (0, 1), "topk" / "effective-rank" select a single
    local metric with β = (1, 0) / (0, 1) and γ = (0, 1).
    """
    if fusion not in FUSIONS:
        raise SensloraError(f"unknown fusion {fusion!r}; choose one of: {', '.join(FUSIONS)}")
    if score not in SCORES:
        raise SensloraError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)}")
    if not scores:
        raise SensloraError("no target matrices to score")
    weigh = FUSIONS[fusion]
    s_global = np.array([s.s_global for s in scores], dtype=np.float64)
    s_topk = np.array([s.s_topk for s in scores], dtype=np.float64)
    s_eff = np.array([s.s_eff for s in scores], dtype=np.float64)

    if score in ("fused", "local"):
        beta1, beta2 = weigh(s_topk), weigh(s_eff)
    else:
        beta1, beta2 = {"global": (0.0, 0.0), "topk": (1.0, 0.0), "effective-rank": (0.0, 1.0)}[score]
    s_local = beta1 * s_topk + beta2 * s_eff

    if score == "fused":
        gamma1, gamma2 = weigh(s_global), weigh(s_local)
    else:
        gamma1, gamma2 = (1.0, 0.0) if score == "global" else (0.0, 1.0)
    theta = gamma1 * s_global + gamma2 * s_local
    return theta, {"beta1": beta1, "beta2": beta2, "gamma1": gamma1, "gamma2": gamma2}
