"""Named allocation recipes: the paper's, unchanged, and the product's default.

A recipe fixes every choice of how sensitivity becomes ranks (estimator, statistics, metrics,
fusion, strategy, shaping). :func:`resolve` starts from a preset and applies the caller's explicit
choices on top, so ``--preset paper --rho 2`` is the paper's recipe with a rank cap.

- ``paper``: Sensitivity-LoRA exactly as published (activation estimator over every token, fused
  score with sigma/mu^2 weights, SRA, no cap). It reproduces the allocations of senslora <= 0.1:
  the same ranks, and scores to float precision (tests/test_presets.py checks stored copies).
- ``robust``: the default. See docs/METHOD-NOTES.md ("Robust default") for the diagnosis and the
  validation sweep behind each choice.
"""

from __future__ import annotations

from typing import Any

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
PRESETS["robust"] = {**PRESETS["paper"], "sink": "drop", "rho": 2.0}
DEFAULT_PRESET = "robust"


def resolve(preset: str | None = None, **choices: Any) -> dict[str, Any]:
    """The full recipe: ``preset``'s values, overridden by every choice that is not None."""
    name = DEFAULT_PRESET if preset is None else preset
    if name not in PRESETS:
        raise SensloraError(f"unknown --preset {name!r}; choose one of: {', '.join(PRESETS)}")
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
