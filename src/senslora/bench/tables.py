"""Markdown formatting shared by the report's sections: numbers, settings' labels, tables."""

from __future__ import annotations

import json
import math
from typing import Any


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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]
