"""Training options (``TrainConfig.options``, ``--option KEY=VALUE``, ``options.KEY`` in a benchmark):
the keys that are read and what each accepts, checked before a run starts.

Every method reads the allocator's options (``senslora train`` always passes them; only senslora
and tsqlora use them), ``target_modules`` and the layer / data selection options; a method reads
its own extra ones from :attr:`senslora.training.methods.base.Method.option_keys` (e.g. eva's ``eva_rho``).
"""

from __future__ import annotations

import json
from typing import Any

from ..core.errors import SensloraError
from ..core.presets import Check, is_number, one_of

# Defined here rather than in .config, which imports this module (both read them; config re-exports).
LAYER_SELECTIONS = ("all", "cka")
DATA_SELECTIONS = ("none", "quality")


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _or_null(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _checks() -> dict[str, tuple[Check, str]]:
    from ..core.estimators import ACCUMULATE_ON
    from ..core.inits import INITS
    from ..core.peft_bridge import ALPHA_MODES
    from ..core.pipeline import BUDGET_MODES
    from ..core.presets import PRESETS, recipe_checks

    def targets(v: Any) -> bool:
        return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))

    # the allocation recipe (senslora.core.presets, the one table): null takes the preset's value
    recipe = {"preset": one_of(*PRESETS), **recipe_checks()}
    nullable = {k: (_or_null(check), accepted + " or null") for k, (check, accepted) in recipe.items()}
    return {
        **nullable,
        "categories": (lambda v: _is_int(v, 1), "an integer >= 1"),
        "r_min": (lambda v: _is_int(v, 0), "an integer >= 0"),
        "r_max": (lambda v: v is None or _is_int(v, 1), "an integer >= 1 or null"),
        "budget_mode": one_of(*BUDGET_MODES),
        "alpha_mode": one_of(*ALPHA_MODES),
        "num_probes": (lambda v: _is_int(v, 1), "an integer >= 1"),
        "accumulate_on": one_of(*ACCUMULATE_ON),
        "init": (lambda v: v is None or v in INITS, "one of " + ", ".join(INITS) + " or null"),
        "init_step": (lambda v: v is None or (is_number(v) and v > 0), "a number > 0 or null"),
        # the training loop's
        "target_modules": (targets, "a regex, a list of module names, or null"),
        "layer_select": one_of(*LAYER_SELECTIONS),
        "layer_ratio": (lambda v: is_number(v, 0, 1) and v > 0, "a number in (0, 1]"),
        "layer_budget": one_of("match", "kept"),
        "data_select": one_of(*DATA_SELECTIONS),
        "data_keep": (lambda v: is_number(v, 0, 1) and v > 0, "a number in (0, 1]"),
        "plot": (lambda v: isinstance(v, bool), "true or false"),
        # method-specific (Method.option_keys)
        "eva_rho": (lambda v: is_number(v, 1), "a number >= 1"),
        "gora_gamma": (lambda v: is_number(v) and v > 0, "a number > 0"),
    }


METHOD_SPECIFIC = ("eva_rho", "gora_gamma")


def check_options(options: dict[str, Any], method: Any) -> None:
    """Raise :class:`SensloraError` for an option ``method`` does not read or a value it cannot use."""
    checks = _checks()
    allowed = {k for k in checks if k not in METHOD_SPECIFIC} | set(method.option_keys)
    for key, value in options.items():
        if key not in allowed:
            own = [k for k in METHOD_SPECIFIC if k in method.option_keys]
            raise SensloraError(
                f"method {method.name} reads no option {key!r}; its options are the allocator's, "
                f"{', '.join(['target_modules', 'layer_select', 'layer_ratio', 'layer_budget', 'data_select', 'data_keep', 'plot', *own])}"
            )
        ok, accepted = checks[key]
        if not ok(value):
            raise SensloraError(f"option {key} must be {accepted}, got {json.dumps(value)}")
    init = options.get("init")
    if init not in (None, "zero") and not method.reads_init:
        raise SensloraError(
            f"method {method.name} has its own adapter initialisation; --init {init} applies to lora and "
            "senslora (and methods built on them) only"
        )
    from ..core.inits import check_init

    check_init(method.init_for(options) or "zero", options.get("preset"))  # the same rule as AllocationConfig's


def parse_option(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``: VALUE is JSON (``true``, ``0.5``, ``"text"``, ``[...]``);
    a bare word that is not JSON is kept as a string, for the options that take one (the value is
    checked by :func:`check_options`, so ``plot=flase`` is an error, not true)."""
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise SensloraError(f"--option takes KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw
