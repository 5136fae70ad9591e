"""The one path policy for names: a folder or file name senslora derives from a name (benchmark
experiments, run ids, report plots, cached models) is one safe path component, or refused.

Pure string code, in core so that both the data layer's loaders (the GGUF cache) and its guard
(:mod:`senslora.data.guard`, which re-exports it) can use it without importing each other.
"""

from __future__ import annotations

import hashlib
import re

from .errors import SensloraError

_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")
MAX_COMPONENT = 200  # bytes; file systems allow 255, leaving room for suffixes such as .tmp-XXXX


def _component_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return "it names a folder above or itself"
    if _UNSAFE.search(name):
        return "it holds a path separator or a control character"
    if name.startswith("."):
        return "it starts with '.' (hidden)"
    if len(name.encode()) > MAX_COMPONENT:
        return f"it is longer than {MAX_COMPONENT} bytes"
    return None


def path_component(name: object, what: str, *, escape: bool = False) -> str:
    """``name`` as one safe path component of a folder or file senslora derives from it.

    Refused (one line naming ``what`` and why), or with ``escape`` made safe: separators and
    control characters become ``_``, a leading ``.`` becomes ``_``, an empty name ``_``, an
    over-long one is cut and given a hash of the whole."""
    text = name if isinstance(name, str) else None
    problem = "it is not a text" if text is None else _component_problem(text)
    if problem is None:
        return text
    if not escape:
        raise SensloraError(
            f"{what} {name!r} cannot name a folder or file ({problem}); use letters, digits and - _ . = , + "
            "(not a leading .)"
        )
    safe = _UNSAFE.sub("_", str(name))
    safe = "_" + safe[1:] if safe.startswith(".") else safe or "_"
    if len(safe.encode()) > MAX_COMPONENT:
        safe = safe.encode()[: MAX_COMPONENT - 11].decode("utf-8", "ignore") + "-" + hashlib.sha1(
            str(name).encode()
        ).hexdigest()[:10]
    return safe
