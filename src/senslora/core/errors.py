"""User-facing errors, and the one place that turns failed loads and SIGTERM into them.

Anything the user can fix (a bad path, an out-of-range number, an empty data set) raises
:class:`SensloraError`. The CLI prints it as one line and exits with status 2; library users can
catch it. Programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any


class SensloraError(ValueError):
    """A problem with the user's input, with a message that says what to do."""


class SensloraWarning(UserWarning):
    """A result the user should look at but that is not an error (a preset's init that could not
    run and fell back, an allocation concentrated on one matrix). Library users can filter it; the
    CLI prints it as one ``senslora: warning: ...`` line, like the data loaders' warnings."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds exactly like Ctrl-C (SIGINT)."""


def raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (temporary folders are removed,
    checkpoints kept, locks released, as for Ctrl-C)."""
    import signal

    def handler(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def name_items(items: Sequence[Any], limit: int = 5) -> str:
    """``a, b, c`` for a few items; the first ``limit`` and how many more for a long list (an
    error line names a few and counts the rest, never thousands)."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What libraries raise on a missing, truncated or corrupt file (JSON, pickle, torch, safetensors)."""
    import pickle
    import zipfile

    errors: list[type[BaseException]] = [OSError, ValueError, RuntimeError, KeyError, TypeError]
    errors += [AttributeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    return tuple(errors)


@contextlib.contextmanager
def loading(what: str, path: str | os.PathLike[str], fix: str) -> Iterator[None]:
    """Turn a library's exception while loading ``what`` from ``path`` into one
    :class:`SensloraError` line naming the file and ``fix`` (what to do)."""
    try:
        yield
    except SensloraError:
        raise
    except _load_errors() as exc:
        raise SensloraError(f"cannot load {what} {path} ({first_line(exc)}); {fix}") from exc


# ------------------------------------------------------------------------- foreign exceptions
# Libraries whose exceptions inside a subcommand are the user's problem to fix (a model, a file,
# a setting they chose), not senslora's bug: the CLI reports them as one line naming the step.
FOREIGN_PACKAGES = (
    "peft",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "accelerate",
    "datasets",
    "gguf",
)
DEBUG_HINT = "rerun with --debug (or SENSLORA_DEBUG=1) for the traceback"


@contextlib.contextmanager
def step(what: str, fix: str) -> Iterator[None]:
    """Name the step the block runs (``loading the model``) and what the user can do when a
    library fails inside it; :func:`foreign_error` reports the innermost step."""
    try:
        yield
    except BaseException as exc:
        if getattr(exc, "_senslora_step", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                exc._senslora_step = (what, fix)  # type: ignore[attr-defined]
        raise


def _package(module: object) -> str:
    return str(module or "").split(".", 1)[0]


def foreign_family(exc: BaseException) -> str | None:
    """``peft``, ``transformers``, ... (:data:`FOREIGN_PACKAGES`) when ``exc`` is of one of their
    types or was raised in their code (the deepest Python frame of its traceback), ``the OS`` for
    any ``OSError``; None otherwise (senslora's own bugs keep their traceback)."""
    if isinstance(exc, (SensloraError, KeyboardInterrupt)):
        return None
    family = _package(type(exc).__module__)
    if family in FOREIGN_PACKAGES:
        return family
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        family = _package(tb.tb_frame.f_globals.get("__name__"))
        if family in FOREIGN_PACKAGES:
            return family
    return "the OS" if isinstance(exc, OSError) else None


def foreign_error(exc: BaseException, command: str = "the command") -> str | None:
    """One line for an exception of a library or the OS (:func:`foreign_family`): the step it
    failed in, what the library said, and the fix; None for any other exception."""
    family = foreign_family(exc)
    if family is None:
        return None
    what, fix = getattr(exc, "_senslora_step", None) or (
        command,
        "check the inputs the step reads (model folder, data files, flags)",
    )
    text = str(exc).strip()
    said = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return f"{what} failed: {family} raised {said}; {fix}; {DEBUG_HINT}"
