"""Protection of inputs and outputs, shared by every subcommand that writes.

* :func:`check_apart`: an output folder (``--out``, ``--merge``) must not equal, contain or lie
  inside any input (model folder, data and calibration files, run folders, the benchmark config),
  compared after resolving symlinks, so that ``--overwrite`` can never replace or delete an input.
* :func:`output_lock`: one writer per output folder. ``.NAME.lock`` next to the folder (beside its
  temporary twin ``.NAME.tmp-*``) is created atomically (``O_CREAT | O_EXCL``), holds the writer's
  pid and host, and is removed on exit. The holder also keeps an ``flock`` on it, which the kernel
  drops when the process dies, so a lock left by a crashed or killed run is told apart from a live
  one: it is reported with its pid and taken over, and the folder's state is then checked as on
  any rerun (``--resume``, finished benchmark runs skipped).
* :func:`writing`: :func:`check_output`, then both, in that order, before anything is written.
* :func:`check_output`: every output folder flag (``--out``, ``--merge``) names a folder or
  nothing yet: not empty, not ``.`` / ``..``, not an existing file, broken symlink or symlink loop
  (``--overwrite`` replaces folders only).
* :func:`path_component`: every path senslora derives from a name (experiment and run names,
  plot files, cached models) is one safe component: no separator, not ``.`` / ``..``, not
  empty, not hidden; refused with one line, or escaped.
* :func:`check_input_file`: a data or config file that is missing, a folder or not a regular
  file is one line saying which.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..core.errors import SensloraError
from ..core.names import MAX_COMPONENT as MAX_COMPONENT  # re-exported
from ..core.names import path_component as path_component  # re-exported

logger = logging.getLogger(__name__)

Inputs = Iterable[tuple[str, "str | os.PathLike[str] | None"]]  # (what it is, path or None)
DATA_PREFIXES = ("csv:", "jsonl:", "parquet:", "disk:")


# ------------------------------------------------------------------------------------- inputs
def model_input(spec: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    """A ``--model`` value as an input: a local folder or GGUF file (aliases live in the package
    cache, hub models in the HF cache)."""
    from .models import is_local_spec

    name = None if spec is None else os.fspath(spec)
    return "the model folder", None if name is None or not is_local_spec(name) else Path(name).expanduser()


def data_input(
    spec: str | os.PathLike[str] | None, what: str = "the calibration data"
) -> tuple[str, Path | None]:
    """A ``--calib`` value or a task spec (``csv:PATH`` / ``jsonl:PATH`` / ``parquet:PATH`` / ``disk:PATH``) as an input."""
    from .examples import CALIB_ALIASES

    name = None if spec is None else os.fspath(spec)
    if name is None or name in CALIB_ALIASES or name.startswith(("hf:", "glue:")):
        return what, None
    if name.startswith(DATA_PREFIXES):
        return what, Path(name.partition(":")[2]).expanduser()
    return what, Path(name).expanduser()


def task_input(spec: str | None) -> tuple[str, Path | None]:
    """A ``--task`` value as an input: the data file or folder of a generic task (``csv:PATH``, ...)."""
    if spec is None or not spec.startswith(DATA_PREFIXES):
        return "the task data", None
    return data_input(spec, "the task data")


def check_input_file(path: str | os.PathLike[str], what: str, hint: str = "") -> Path:
    """``path`` as a regular file, else one line saying what it is (missing, a folder, ...);
    ``hint`` (e.g. ``for a folder write disk:PATH``) is added when it is a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise SensloraError(f"{what} {p} is a folder, not a file{'; ' + hint if hint else ''}")
    if p.is_symlink() or p.exists():
        raise SensloraError(f"{what} {p} is not a regular file ({_kind(p)}); pass a file")
    raise SensloraError(f"{what} {p} does not exist")


# ------------------------------------------------------------------------------------- names
# The one path policy for names lives in core (core/names.py), below the model loaders that use it too.


# ------------------------------------------------------------------------------------- outputs
def _kind(path: Path) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        return "a broken symlink" if os.path.islink(path) else "unreadable"
    if stat.S_ISREG(mode):
        return "a file"
    return "a folder" if stat.S_ISDIR(mode) else "not a file or folder"


def check_output(out: str | os.PathLike[str], inputs: Inputs = (), *, flag: str = "--out") -> Path:
    """The one check of every output folder flag: ``out`` is not empty, not ending in ``.`` /
    ``..``, not (under) a symlink loop, apart from ``inputs`` (:func:`check_apart`), and nothing
    or a folder (a symlink to one) where it points: an existing file or broken symlink is refused,
    with ``--overwrite`` or not (it is not a folder to replace)."""
    text = os.fspath(out)
    if not text.strip():
        raise SensloraError(f"{flag} is empty; name the output folder, e.g. {flag} runs/x")
    path = Path(text).expanduser()
    if path.name in ("", ".", ".."):
        raise SensloraError(f"{flag} {text} names an existing folder above or itself; name a new folder in it")
    if not os.path.lexists(path):
        try:
            os.stat(path.parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SensloraError(f"{flag} {text} lies under a symlink loop; choose another {flag}") from None
        check_apart(path, inputs, flag=flag)
        return path
    kind = _kind(path)
    if kind != "a symlink loop":
        check_apart(path, inputs, flag=flag)  # "is the calibration data" says more than "is a file"
    if kind != "a folder":
        raise SensloraError(
            f"{flag} {text} exists and is not a folder ({kind}); {flag} names a folder (--overwrite replaces "
            f"folders only, never a file): choose another {flag}"
        )
    return path


# ------------------------------------------------------------------------------------- overlap
def _overlap(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "lies inside"
    return None


def check_apart(out: str | os.PathLike[str], inputs: Inputs, *, flag: str = "--out") -> None:
    """Refuse an output folder that is, contains or lies inside one of ``inputs`` (symlinks resolved)."""
    target = Path(out).expanduser().resolve()
    for what, path in inputs:
        if path is None:
            continue
        relation = _overlap(target, Path(path).expanduser().resolve())
        if relation is not None:
            raise SensloraError(
                f"{flag} {out} {relation} {what} {path}; an output must be apart from every input "
                f"(--overwrite would replace it): choose another {flag}"
            )


# ------------------------------------------------------------------------------------- lock
def lock_path(out: str | os.PathLike[str]) -> Path:
    """``.NAME.lock`` next to the output folder ``NAME``."""
    final = Path(out).expanduser().absolute()
    return final.parent / f".{final.name}.lock"


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing ancestors; the ones created, deepest first."""
    created = []
    probe = folder
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        for made in created:
            with contextlib.suppress(OSError):
                made.rmdir()
        raise SensloraError(f"cannot create {folder} ({exc.strerror or exc}); choose another --out") from None
    return created


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 200).decode("utf-8", "replace").split()
    return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "a process that had just started"


def _open_lock(path: Path) -> tuple[int, bool]:
    """(descriptor, created): a new lock file (``O_EXCL``), else the existing one."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        return os.open(path, os.O_RDWR), False


def _acquire(path: Path, out: Path) -> int:
    import fcntl

    for _ in range(5):
        try:
            fd, created = _open_lock(path)
        except FileNotFoundError:  # released between our two opens: try again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise SensloraError(
                f"{out} is being written by another senslora process ({holder}, lock {path}); wait for it to "
                "finish or choose another --out"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed it while we waited for it: start over
            os.close(fd)
            continue
        if not created and os.fstat(fd).st_size:
            logger.warning(
                "%s was locked by %s, which is no longer running (crashed or killed); taking over %s",
                out,
                _holder(fd),
                path,
            )
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except BaseException:
            _release(path, fd)
            raise
        return fd
    raise SensloraError(f"cannot take the lock {path} (it keeps changing); retry")


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of the output folder ``out`` (see the module docstring); yields the lock path.

    Folders created to hold the lock are removed again on exit when they stay empty."""
    path = lock_path(out)
    created = _make_parents(path.parent)
    try:
        fd = _acquire(path, Path(out))
        try:
            yield path
        finally:
            _release(path, fd)
    finally:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def writing(
    out: str | os.PathLike[str], inputs: Inputs = (), *, flag: str = "--out", lock: bool = True
) -> Iterator[None]:
    """Check ``out`` (:func:`check_output`) and that it is apart from ``inputs``, then hold its lock
    (when ``lock``) inside the block."""
    check_output(out, inputs, flag=flag)
    if not lock:
        yield
        return
    with output_lock(out):
        yield
