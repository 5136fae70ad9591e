"""senslora: Sensitivity-LoRA rank allocation for PEFT.

The public names are imported lazily (PEP 562), so ``import senslora`` stays cheap (no torch)::

    from senslora import allocate, load_model, make_batches
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "allocate": "pipeline",
    "Allocation": "pipeline",
    "estimate_diagonals": "estimators",
    "ESTIMATORS": "estimators",
    "PRESETS": "presets",
    "load_model": "models",
    "load_examples": "data",
    "sample_examples": "data",
    "make_batches": "data",
    "SensloraError": "errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ does the import
    from .data import load_examples, make_batches, sample_examples  # noqa: F401
    from .errors import SensloraError  # noqa: F401
    from .estimators import ESTIMATORS, estimate_diagonals  # noqa: F401
    from .models import load_model  # noqa: F401
    from .pipeline import Allocation, allocate  # noqa: F401
    from .presets import PRESETS  # noqa: F401


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'senslora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
