"""Robust shaping of allocation weights and the concentration figures of an allocation (pure math).

The paper's SRA hands each matrix a share of the budget proportional to θ. On decoder LLMs θ is
dominated by a few matrices (massive activations, METHOD.md section 9), so the product offers:

- :func:`temper`: θ^τ with 0 < τ ≤ 1 (τ = 1 is the paper; τ → 0 tends to uniform ranks);
- :func:`normalize_by_role`: θ divided by the mean θ of its matrix role (``q_proj``,
  ``down_proj``, ...), so that each role keeps its uniform share and θ only decides between layers;
- :func:`rank_cap`: a cap on every rank relative to the average rank (``rho``), as PEFT's EVA
  (max rank = rho x r) and AdaLoRA (``init_r``) do.

:func:`concentration` measures how an allocation spends its budget (top matrix and top 5% share of
the LoRA parameters, Gini of the ranks, how many matrices sit at the bounds).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from .errors import SensloraError

NORMALIZE = ("none", "role")


def check_temperature(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and 0 < tau <= 1):
        raise SensloraError(f"--temperature must be in (0, 1], got {tau}")


def temper(theta: np.ndarray, tau: float) -> np.ndarray:
    """θ^τ elementwise (zeros stay zero). Scale-equivariant: (cθ)^τ = c^τ θ^τ, and order-preserving."""
    check_temperature(tau)
    t = np.asarray(theta, dtype=np.float64)
    return t.copy() if tau == 1 else np.power(t, tau)


_LAYER_INDEX = re.compile(r"\.\d+\.")


def role_of(name: str) -> str:
    """A matrix's role: its full name with the block index removed, e.g.
    ``model.layers.3.self_attn.q_proj`` -> ``model.layers.self_attn.q_proj``."""
    return _LAYER_INDEX.sub(".", "." + name + ".").strip(".")


def normalize_by_role(theta: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """θ_w / mean(θ over the matrices of w's role); a role whose θ are all 0 gets 1 everywhere
    (its uniform share). Invariant to rescaling θ, and to rescaling any one role."""
    t = np.asarray(theta, dtype=np.float64)
    if len(names) != t.size:
        raise ValueError(f"{len(names)} names for {t.size} weights")
    roles = np.array([role_of(n) for n in names])
    out = np.ones_like(t)
    for role in dict.fromkeys(roles):
        sel = roles == role
        mean = float(t[sel].mean())
        if mean > 0:
            out[sel] = t[sel] / mean
    return out


def check_rho(rho: float | None) -> None:
    if rho is None or rho == 0:
        return
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 1):
        raise SensloraError(f"--rho must be >= 1 (max rank = rho x average rank) or 0 (no cap), got {rho}")


def rank_cap(avg_rank: float, rho: float | None) -> int | None:
    """The largest rank any matrix may get: floor(rho · avg_rank), at least ceil(avg_rank) so the
    budget stays reachable; None without a cap (``rho`` None or 0)."""
    check_rho(rho)
    if not rho:
        return None
    return max(math.ceil(avg_rank), math.floor(rho * avg_rank * (1 + 1e-12)))


def gini(x: Sequence[float] | np.ndarray) -> float:
    """Gini coefficient of non-negative values (0: all equal; tends to 1 when one holds everything)."""
    v = np.sort(np.asarray(x, dtype=np.float64).reshape(-1))
    n, total = v.size, float(v.sum())
    if n == 0 or total == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float((2 * np.dot(i, v) / (n * total)) - (n + 1) / n)


def concentration(
    ranks: Sequence[int], params: Sequence[int], r_min: int, r_max: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """How concentrated an allocation is.

    ``top_matrix_share`` / ``top5pct_share``: share of the LoRA parameters held by the largest
    matrix / by the ceil(5%) matrices with the most parameters; ``rank_gini``; ``max_rank_over_avg``;
    ``at_r_min`` / ``at_r_max``: matrices at the lower bound / at their upper bound.
    """
    r = np.asarray(ranks, dtype=np.int64)
    p = np.sort(np.asarray(params, dtype=np.float64))[::-1]
    total = float(p.sum()) or 1.0
    k = max(1, math.ceil(0.05 * p.size))
    avg = float(r.mean()) if r.size else 0.0
    return {
        "top_matrix_share": float(p[0] / total) if p.size else 0.0,
        "top5pct_share": float(p[:k].sum() / total),
        "top5pct_matrices": int(k),
        "rank_gini": gini(r),
        "max_rank_over_avg": float(r.max() / avg) if avg > 0 else 0.0,
        "median_rank": float(np.median(r)) if r.size else 0.0,
        "at_r_min": int((r <= r_min).sum()),
        "at_r_max": int((r >= np.asarray(r_max)).sum()),
    }


# A matrix holding more than this share of the LoRA parameters, and more than
# CONCENTRATION_FACTOR times its share under uniform ranks, triggers a warning.
CONCENTRATION_WARN_SHARE = 0.10
CONCENTRATION_FACTOR = 4.0


def concentration_warning(
    names: Sequence[str], params: Sequence[int], uniform_params: Sequence[float]
) -> str | None:
    """A one-line warning when one matrix takes more than 10% of the LoRA parameters and more than
    4x what uniform ranks give it; None otherwise."""
    p = np.asarray(params, dtype=np.float64)
    u = np.asarray(uniform_params, dtype=np.float64)
    if p.sum() <= 0:
        return None
    share, ushare = p / p.sum(), u / u.sum()
    w = int(np.argmax(share))
    if share[w] > CONCENTRATION_WARN_SHARE and share[w] > CONCENTRATION_FACTOR * ushare[w]:
        return (
            f"{names[w]} takes {share[w]:.0%} of the LoRA parameters ({share[w] / ushare[w]:.0f}x its "
            "uniform share); cap it with --rho 2 or use the default --preset robust"
        )
    return None
