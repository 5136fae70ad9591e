"""Markdown formatting shared by the report's sections: numbers, settings' labels, tables."""

from __future__ import annotations

import json
import math
from typing import Any

from .grid import BEST_OF


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _row_key(run: dict, drop: tuple[str, ...] = ("seed",)) -> tuple:
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in run["_meta"]["grid"].items() if k not in drop)


def _matches(run: dict, setting: dict) -> bool:
    """Whether a run's grid point (or, for keys not in its grid, its params) holds ``setting``."""
    return all(run["_meta"]["grid"].get(k, run["_meta"]["params"].get(k)) == v for k, v in setting.items())


def _label(key: tuple) -> str:
    return ", ".join(f"{k}={json.loads(v)}" for k, v in key) or "(single setting)"


def _setting_name(setting: dict) -> str:
    """A short name for a grid setting: {variant: {method: senslora, options.preset: paper}} ->
    "senslora, preset=paper"."""
    parts = []
    for k, v in setting.items():
        items = v.items() if isinstance(v, dict) else [(k, v)]
        # a rate taken from a validation sweep ("best-of:EXPERIMENT") is every setting's own tuned
        # rate: the page says so once instead of naming the sweep in every label
        parts += [
            str(b) if a == "method" else f"{a.removeprefix('options.')}={b}"
            for a, b in items
            if not (isinstance(b, str) and b.startswith(BEST_OF))
        ]
    return ", ".join(parts) or "default"


def _short_label(key: tuple) -> str:
    """:func:`_setting_name` of a row key (:func:`_row_key`): ``senslora, init=gradient``."""
    return _setting_name({k: json.loads(v) for k, v in key})


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]
