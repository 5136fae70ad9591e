"""Fine-tuning methods, one module each, registered in :data:`senslora.training.methods.base.METHODS`."""

from __future__ import annotations

from .base import METHODS, Method, MethodContext, get_method, load_all, register

__all__ = ["METHODS", "Method", "MethodContext", "get_method", "load_all", "register"]
