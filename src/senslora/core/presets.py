"""Named allocation recipes: the paper's, unchanged, and the product's default.

A recipe fixes every choice of how sensitivity becomes ranks (estimator, statistics, metrics,
fusion, strategy, shaping). :func:`resolve` starts from a preset and applies the caller's explicit
choices on top, so ``--preset paper --rho 2`` is the paper's recipe with a rank cap.

- ``paper``: Sensitivity-LoRA exactly as published (activation estimator over every token, fused
  score with sigma/mu^2 weights, SRA, no cap). It reproduces the allocations of senslora <= 0.1:
  the same ranks, and scores to float precision (tests/test_presets.py checks stored copies).
- ``robust``: the default: the paper's recipe with EVA's rank cap (every rank <= 2x the average
  rank), and the gradient init (:data:`PRESET_INITS`). See docs/METHOD-NOTES.md ("Robust
  default", "The default decision") for the diagnosis and the validation sweeps that chose them.
"""

from __future__ import annotations

from typing import Any

from . import checks as _checks
from .checks import Check, activation_checks, is_number, one_of  # noqa: F401  (re-exported: the recipe checks' names)
from .errors import SensloraError

RECIPE_KEYS = (
    "estimator",
    "sink",
    "token_trim",
    "saliency",
    "score",
    "fusion",
    "topk_fraction",
    "alpha",
    "strategy",
    "temperature",
    "normalize",
    "rho",
)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "estimator": "activation",
        "sink": "keep",
        "token_trim": 0.0,
        "saliency": "hessian",
        "score": "fused",
        "fusion": "sigma-mu2",
        "topk_fraction": 0.5,
        "alpha": 0.85,
        "strategy": "sra",
        "temperature": 1.0,
        "normalize": "none",
        "rho": 0,
    },
}
# Chosen on validation only (benchmarks/robust.yaml sweep-chat / sweep-movie; docs/METHOD-NOTES.md).
PRESETS["robust"] = {**PRESETS["paper"], "rho": 2.0}
DEFAULT_PRESET = "robust"
#: The adapter initialisation each preset starts from when --init is not given (core/inits.py).
#: ``paper`` is always PEFT's zero init. benchmarks/v3.yaml's validation stage chose ``gradient`` for
#: ``robust`` (docs/METHOD-NOTES.md, "The default decision"; by +0.0002 mean accuracy, inside the
#: seed noise). Where it cannot run (calibration batches without labels, offloaded blocks) the
#: preset's init falls back to ``zero`` with a warning (core/pipeline.py ``_runnable_init``).
PRESET_INITS: dict[str, str] = {"paper": "zero", "robust": "gradient"}


def preset_init(preset: str | None) -> str:
    """The init of ``preset`` (None: the default preset's) when --init is not given; a preset
    without an entry in :data:`PRESET_INITS` starts from PEFT's ``zero``."""
    return PRESET_INITS.get(_known(preset), "zero")


def _known(preset: str | None) -> str:
    """``preset``'s name (None: the default preset), or a one-line error for an unknown one."""
    name = DEFAULT_PRESET if preset is None else preset
    if name not in PRESETS:
        raise SensloraError(f"unknown --preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return name


def resolve(preset: str | None = None, **choices: Any) -> dict[str, Any]:
    """The full recipe: ``preset``'s values, overridden by every choice that is not None."""
    name = _known(preset)
    unknown = sorted(set(choices) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"not recipe options: {', '.join(unknown)}")
    recipe = dict(PRESETS[name])
    recipe.update({k: v for k, v in choices.items() if v is not None})
    return recipe


def recipe_name(preset: str | None, recipe: dict[str, Any]) -> str:
    """``preset`` if the recipe is exactly it, else ``preset+changes`` (e.g. ``paper+rho=2``)."""
    name = DEFAULT_PRESET if preset is None else preset
    changed = [f"{k}={recipe[k]}" for k in RECIPE_KEYS if recipe[k] != PRESETS[name][k]]
    return name + ("+" + ",".join(changed) if changed else "")


# ----------------------------------------------------------------- the one table of recipe checks


def recipe_checks() -> dict[str, tuple[Check, str]]:
    """Per recipe key: a predicate and what it accepts. The only place the recipe's values are
    range-checked: ``allocate`` (:func:`check_recipe`), training / benchmark options
    (:mod:`senslora.training.options`) and the activation estimator's own arguments
    (:func:`senslora.core.checks.activation_checks`, part of this table) all read it."""
    from .allocation import STRATEGIES
    from .diagonal import SALIENCIES
    from .estimators import ESTIMATORS
    from .metrics import FUSIONS, SCORES
    from .shaping import NORMALIZE

    unit = (lambda v: is_number(v, 0, 1) and v > 0, "a number in (0, 1]")
    return {
        "estimator": one_of(*ESTIMATORS),
        **activation_checks(),
        "saliency": one_of(*SALIENCIES),
        "score": one_of(*SCORES),
        "fusion": one_of(*FUSIONS),
        "topk_fraction": unit,
        "alpha": unit,
        "strategy": one_of(*STRATEGIES),
        "temperature": unit,
        "normalize": one_of(*NORMALIZE),
        "rho": (lambda v: v == 0 or is_number(v, 1), "0 (no cap) or a number >= 1 (max rank = rho x average rank)"),
    }


def check_value(key: str, value: Any, checks: dict[str, tuple[Check, str]] | None = None) -> None:
    """One-line :class:`SensloraError` naming the flag when ``value`` is not acceptable for ``key``."""
    _checks.check_value(key, value, checks or recipe_checks())


def check_recipe(recipe: dict[str, Any]) -> None:
    """Every value of a resolved recipe, then the one rule between keys."""
    checks = recipe_checks()
    for key in RECIPE_KEYS:
        check_value(key, recipe[key], checks)
    if recipe["estimator"] != "activation" and (recipe["sink"] != "keep" or recipe["token_trim"]):
        raise SensloraError(
            "--sink drop and --token-trim apply to the activation estimator only; "
            "pass --sink keep --token-trim 0 with another --estimator"
        )
