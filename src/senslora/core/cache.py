"""Cache folder and crash-safe file helpers.

The cache lives in ``$SENSLORA_CACHE`` or ``~/.cache/senslora``. Everything written there is
built in a temporary sibling and renamed into place only when complete, so an interrupted run
never leaves a half-written folder or file under the final name. Folders that are expensive to
build carry a ``senslora-manifest.json`` with the SHA-256 of every file, checked before use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST_NAME = "senslora-manifest.json"
_CHUNK = 1 << 20


def cache_dir(*parts: str) -> Path:
    """The cache folder (``$SENSLORA_CACHE`` or ``~/.cache/senslora``), joined with ``parts``.

    Nothing is created; writers use :func:`atomic_dir` / :func:`atomic_write_text`.
    """
    root = os.environ.get("SENSLORA_CACHE") or os.path.join("~", ".cache", "senslora")
    return Path(root).expanduser().joinpath(*parts)


def _umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final_path``; on success rename it to ``final_path``.

    On an exception the temporary folder is removed and ``final_path`` is left untouched. An
    existing ``final_path`` is replaced. If another process put a folder at ``final_path``
    while this one was building (the rename fails), that folder is kept and ours is discarded.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes it 0700
    old: Path | None = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rmdir(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            if old is not None:
                os.replace(old, final)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary sibling file and an atomic rename."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_json_record(path: str | os.PathLike[str], filename: str, parse, *, missing: str, invalid: str = ""):
    """``parse(json)`` of ``path`` (a file, or a folder holding ``filename``), with one-line errors.

    ``missing`` ends the error when there is no such file; ``invalid`` (if given) ends the error
    when the file does not parse.
    """
    from .errors import SensloraError

    p = Path(path)
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        raise SensloraError(f"no {filename} at {p}; {missing}")
    try:
        return parse(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError) as exc:
        tail = f"; {invalid}" if invalid else ""
        raise SensloraError(f"{p} is not a valid {filename} ({type(exc).__name__}: {exc}){tail}") from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[str]:
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            files.append(path.relative_to(folder).as_posix())
    return files


def write_manifest(folder: str | os.PathLike[str], **info: object) -> dict:
    """Write ``senslora-manifest.json`` into ``folder``: size and SHA-256 of every other file.

    Extra keyword arguments are stored as-is (e.g. where the folder was built from).
    """
    root = Path(folder)
    files = {
        rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
        for rel in _folder_files(root)
    }
    manifest = {"format": 1, **info, "files": files}
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def check_manifest(folder: str | os.PathLike[str]) -> str | None:
    """``None`` if ``folder`` matches its manifest, else a short reason why not.

    Every listed file must exist with the recorded size and SHA-256; files not listed are
    ignored. A missing folder, a missing or unreadable manifest, or an empty file list fail.
    """
    root = Path(folder)
    if not root.is_dir():
        return "folder is missing"
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            return "manifest lists no files"
    except FileNotFoundError:
        return f"{MANIFEST_NAME} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST_NAME} is unreadable"
    for rel, entry in sorted(files.items()):
        path = root / rel
        try:
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != entry["size"]:
                return f"{rel} has the wrong size"
            if sha256_file(path) != entry["sha256"]:
                return f"{rel} has the wrong SHA-256"
        except (OSError, KeyError, TypeError):
            return f"{rel} cannot be checked"
    return None
