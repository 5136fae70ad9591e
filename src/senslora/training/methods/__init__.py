"""Fine-tuning methods, one module each, registered in :data:`senslora.training.methods.base.METHODS`."""

from __future__ import annotations

import importlib

from .base import METHODS, Method, MethodContext, get_method, register

# Modules that register methods when imported (kept lazy: they import peft / transformers).
_MODULES = ("lora", "adalora", "dylora", "adapters", "eva", "full", "related", "gora", "loraga", "pissa")


def load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


__all__ = ["METHODS", "Method", "MethodContext", "get_method", "load_all", "register"]
