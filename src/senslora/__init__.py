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
    "allocate": "core.pipeline",
    "Allocation": "core.pipeline",
    "AllocationConfig": "core.config",
    "estimate_diagonals": "core.estimators",
    "ESTIMATORS": "core.estimators",
    "PRESETS": "core.presets",
    "load_model": "data.models",
    "load_examples": "data.examples",
    "sample_examples": "data.examples",
    "make_batches": "data.examples",
    "SensloraError": "core.errors",
    "SensloraWarning": "core.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ does the import
    from .core.config import AllocationConfig  # noqa: F401
    from .core.errors import SensloraError, SensloraWarning  # noqa: F401
    from .core.estimators import ESTIMATORS, estimate_diagonals  # noqa: F401
    from .core.pipeline import Allocation, allocate  # noqa: F401
    from .core.presets import PRESETS  # noqa: F401
    from .data.examples import load_examples, make_batches, sample_examples  # noqa: F401
    from .data.models import load_model  # noqa: F401


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'senslora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
