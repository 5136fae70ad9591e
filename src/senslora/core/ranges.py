"""What a numeric setting accepts, declared once where the setting is declared.

A :class:`Range` sits in a config dataclass field's ``metadata["range"]`` (:class:`~senslora.core.
config.AllocationConfig`, :class:`~senslora.training.config.TrainConfig`) or on a command-line flag
(:mod:`senslora.cli.flags`). :func:`check_fields` checks every field of a config against its range,
and the CLI checks every parsed flag against its own, so no number reaches numpy or torch
unchecked: integer or not, finite, in range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import SensloraError

SEED_MAX = 2**32 - 1  # numpy's seeds are unsigned 32-bit integers


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


@dataclass(frozen=True)
class Range:
    """Numbers in ``[low, high]`` (``low_open`` / ``high_open``: that bound excluded); ``integer``:
    whole numbers only (never a bool). ``text`` replaces the generated description."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    text: str | None = None

    def accepts(self, value: Any) -> bool:
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """``an integer >= 0``, ``a number > 0``, ``a number in [0, 1)``, ..."""
        if self.text is not None:
            return self.text
        what = "an integer" if self.integer else "a number"
        if math.isfinite(self.low) and math.isfinite(self.high):
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{_shown(self.low)}, {_shown(self.high)}{right}"
        if math.isfinite(self.low):
            return f"{what} {'>' if self.low_open else '>='} {_shown(self.low)}"
        if math.isfinite(self.high):
            return f"{what} {'<' if self.high_open else '<='} {_shown(self.high)}"
        return what if self.integer else "a finite number"

    def check(self, flag: str, value: Any) -> None:
        """One-line :class:`SensloraError` naming ``flag`` when ``value`` is not accepted."""
        if not self.accepts(value):
            raise SensloraError(f"{flag} must be {self.describe()}, got {value!r}")


SEED = Range(0, SEED_MAX, integer=True)
COUNT = Range(1, integer=True)  # a positive integer


def flag_name(field: dataclasses.Field) -> str:
    """The command-line flag of a config field: ``metadata["flag"]``, else ``--field-name``."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _annotation(field: dataclasses.Field) -> str:
    """``bool``, ``str``, ... : the field's annotation without ``| None``."""
    text = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    return text.replace(" | None", "").strip()


def check_fields(config: Any) -> None:
    """Check every field of the dataclass ``config``: a number against its ``metadata["range"]``, a
    value against its ``metadata["choices"]``, an on/off field is a bool and a text field a string
    (None passes where None is the field's default). One-line :class:`SensloraError` naming the flag."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None and field.default is None:
            continue
        flag = flag_name(field)
        rng, choices = field.metadata.get("range"), field.metadata.get("choices")
        if rng is not None:
            rng.check(flag, value)
        if choices is not None and value not in choices:
            raise SensloraError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
        kind = {"bool": bool, "str": str}.get(_annotation(field))
        if kind is not None and not isinstance(value, kind):
            what = "true or false" if kind is bool else "a text"
            raise SensloraError(f"{flag} must be {what}, got {value!r}")
