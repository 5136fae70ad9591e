"""Value checks below the recipes and the estimators: the predicates of the one table of recipe
checks (:func:`senslora.core.presets.recipe_checks`), and the checks of the activation estimator's
own arguments, which that table includes and the estimator reads from here (so that the estimators
never import the presets, which list the estimators' names)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import SensloraError

Check = Callable[[Any], bool]

# The activation estimator keeps each sequence's first real token (the paper) or leaves it out (``drop``).
SINK_MODES = ("keep", "drop")


def is_number(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    """A finite real number (not a bool) in ``[low, high]``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok and low <= value <= high


def one_of(*choices: Any) -> tuple[Check, str]:
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def activation_checks() -> dict[str, tuple[Check, str]]:
    """The activation estimator's recipe keys (``sink``, ``token_trim``): a predicate and what it accepts."""
    return {
        "sink": one_of(*SINK_MODES),
        "token_trim": (lambda v: is_number(v, 0, 0.5) and v < 0.5, "a number in [0, 0.5)"),
    }


def check_value(key: str, value: Any, checks: dict[str, tuple[Check, str]]) -> None:
    """One-line :class:`SensloraError` naming the flag when ``value`` is not acceptable for ``key``."""
    ok, accepted = checks[key]
    if not ok(value):
        raise SensloraError(f"--{key.replace('_', '-')} must be {accepted}, got {value!r}")
