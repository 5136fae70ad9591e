"""User-facing errors, and the one place that turns failed loads and SIGTERM into them.

Anything the user can fix (a bad path, an out-of-range number, an empty data set) raises
:class:`SensloraError`. The CLI prints it as one line and exits with status 2; library users can
catch it. Programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class SensloraError(ValueError):
    """A problem with the user's input, with a message that says what to do."""


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
