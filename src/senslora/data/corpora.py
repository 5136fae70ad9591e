"""The offline corpora behind the data aliases (real, human-labelled, from PyPI packages).

* VADER ground truth (Hutto & Gilbert, ICWSM 2014): Rotten Tomatoes snippets, tweets, Amazon
  reviews and NYT editorials with a mean human sentiment in [-4, 4]. The files come from the
  vaderSentiment 3.3.2 source tarball (the wheel lacks them), fetched once by ``senslora fetch``
  (scripts/setup.sh runs it, :func:`fetch_vader`) into ``<cache>/data/vader``, SHA-256 checked;
  nothing is downloaded at run time.
* chatterbot-corpus 1.3.3 (English): question -> answer pairs (:func:`chat_pairs`).

:mod:`senslora.data.examples` turns them into the ``movie``, ``tweets``, ``*-score`` and ``chat``
aliases.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..core.cache import MANIFEST_NAME, atomic_dir, cache_dir, check_manifest, sha256_file, write_manifest
from ..core.errors import SensloraError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- VADER
VADER_VERSION = "3.3.2"
VADER_SETS: dict[str, int] = {  # GroundTruth file stem -> expected rows
    "movieReviewSnippets": 10605,
    "tweets": 4200,
    "amazonReviewSnippets": 3708,
    "nytEditorialSnippets": 5190,
}
_VADER_INNER = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_SDIST = f"vaderSentiment-{VADER_VERSION}.tar.gz"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"


def vader_dir() -> Path:
    """Folder holding the VADER ``*_GroundTruth.txt`` files."""
    return cache_dir("data", "vader")


FETCH_HINT = "run `senslora fetch` (or scripts/setup.sh) once"


def _vader_manual_hint(folder: Path) -> str:
    return (
        f"get it by hand: `pip download --no-deps --no-binary :all: vaderSentiment=={VADER_VERSION}`, then "
        f"`senslora fetch --from {VADER_SDIST}`"
    )


def _vader_ready(folder: Path) -> bool:
    files_there = all((folder / f"{name}_GroundTruth.txt").is_file() for name in VADER_SETS)
    if not files_there:
        return False
    if (folder / MANIFEST_NAME).exists():
        return check_manifest(folder) is None
    return True  # copied by hand: accepted, row counts are still checked when read


def _pip_download_vader(dest: Path, folder: Path) -> Path:
    """The vaderSentiment source tarball, downloaded by pip (the user's index and proxy settings)
    into ``dest``. Only :func:`fetch_vader` calls it: nothing downloads at run time."""
    logger.warning("downloading the VADER data (vaderSentiment %s source tarball) with pip", VADER_VERSION)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    cmd += [f"vaderSentiment=={VADER_VERSION}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SensloraError(f"cannot run pip to fetch the VADER data ({exc}); {_vader_manual_hint(folder)}") from exc
    sdists = sorted(dest.glob("*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR" in ln] or lines[-1:]
        detail = errors[0].strip() if errors else f"exit status {proc.returncode}"
        raise SensloraError(f"pip could not download the VADER data ({detail}); {_vader_manual_hint(folder)}")
    return sdists[0]


def _read_vader_sdist(sdist: Path, folder: Path) -> dict[str, bytes]:
    """The ground-truth files inside the vaderSentiment source tarball, after checking its SHA-256."""
    if not sdist.is_file():
        raise SensloraError(f"{sdist} does not exist; {_vader_manual_hint(folder)}")
    digest = sha256_file(sdist)
    if digest != VADER_SDIST_SHA256:
        raise SensloraError(
            f"{sdist} has SHA-256 {digest}, not that of {VADER_SDIST} ({VADER_SDIST_SHA256}); "
            f"{_vader_manual_hint(folder)}"
        )
    try:
        contents: dict[str, bytes] = {}
        with tarfile.open(sdist, "r:gz") as outer:
            inner_file = outer.extractfile(_VADER_INNER)
            if inner_file is None:
                raise KeyError(_VADER_INNER)
            with tarfile.open(fileobj=io.BytesIO(inner_file.read()), mode="r:gz") as inner:
                for name in VADER_SETS:
                    member = inner.extractfile(f"hutto_ICWSM_2014/{name}_GroundTruth.txt")
                    if member is None:
                        raise KeyError(name)
                    contents[name] = member.read()
    except (OSError, KeyError, tarfile.TarError) as exc:
        raise SensloraError(
            f"the vaderSentiment tarball is not as expected ({exc}); {_vader_manual_hint(folder)}"
        ) from exc
    return contents


def fetch_vader(source: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Put the VADER ground-truth files into the cache (``senslora fetch``, run by scripts/setup.sh).

    ``source``: a vaderSentiment source tarball already on disk; else pip downloads it. The tarball's
    SHA-256 is checked, the files are written atomically with a manifest. Already there (and intact)
    and not ``force``: nothing is done. Returns the data folder.
    """
    folder = vader_dir()
    if source is None and not force and _vader_ready(folder):
        return folder
    with tempfile.TemporaryDirectory(prefix="senslora-vader-") as tmp:
        sdist = Path(source).expanduser() if source is not None else _pip_download_vader(Path(tmp), folder)
        contents = _read_vader_sdist(sdist, folder)
    try:
        with atomic_dir(folder) as build:
            for name, data in contents.items():
                (build / f"{name}_GroundTruth.txt").write_bytes(data)
            write_manifest(build, source=f"{VADER_SDIST}:{_VADER_INNER}", source_sha256=VADER_SDIST_SHA256)
    except OSError as exc:
        raise SensloraError(f"cannot write {folder} ({exc}); set SENSLORA_CACHE to a writable folder") from exc
    return folder


def vader_records(name: str) -> list[tuple[str, float, str]]:
    """``(id, mean human score in [-4, 4], text)`` rows of a VADER ground-truth file, in file order.

    ``name`` is ``movieReviewSnippets`` or ``tweets`` (also ``amazonReviewSnippets``,
    ``nytEditorialSnippets``). The data must have been fetched (``senslora fetch``, scripts/setup.sh).
    """
    if name not in VADER_SETS:
        raise SensloraError(f"unknown VADER set {name!r}; use one of {', '.join(VADER_SETS)}")
    folder = vader_dir()
    if not _vader_ready(folder):
        why = "is missing" if not folder.exists() else "is incomplete or damaged"
        raise SensloraError(f"the VADER data in {folder} {why}; {FETCH_HINT} to fetch it")
    path = folder / f"{name}_GroundTruth.txt"
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SensloraError(f"cannot read {path} ({exc}); run `senslora fetch --force` to fetch it again") from exc
    rows: list[tuple[str, float, str]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            if len(parts) != 3:
                raise ValueError("expected 3 tab-separated fields")
            rows.append((parts[0].strip(), float(parts[1]), parts[2].strip()))
        except ValueError as exc:
            raise SensloraError(
                f"{path} line {lineno} is malformed ({exc}); run `senslora fetch --force` to fetch it again"
            ) from exc
    if len(rows) != VADER_SETS[name]:
        raise SensloraError(
            f"{path} has {len(rows)} rows, expected {VADER_SETS[name]}; run `senslora fetch --force` to fetch it again"
        )
    return rows


# ------------------------------------------------------------------------------------------ chat
def _chatterbot_english_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "data" / "english" if locations else None
    if folder is None or not folder.is_dir():
        raise SensloraError(
            "data alias 'chat' needs chatterbot-corpus: run `pip install chatterbot-corpus==1.3.3`"
        )
    return folder


@functools.lru_cache(maxsize=1)
def _chat_records_cached(folder: str) -> tuple[tuple[str, str, str], ...]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    records: list[tuple[str, str, str]] = []
    for path in sorted(Path(folder).glob("*.yml")):
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # a safe loader
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SensloraError(f"cannot read {path} ({exc}); reinstall chatterbot-corpus==1.3.3") from exc
        conversations = doc.get("conversations") if isinstance(doc, dict) else None
        for c_index, conversation in enumerate(conversations or []):
            if not isinstance(conversation, list):
                continue  # e.g. one malformed conversation in trivia.yml is a plain string
            for turn in range(len(conversation) - 1):
                question, answer = conversation[turn], conversation[turn + 1]
                if not (isinstance(question, str) and isinstance(answer, str)):
                    continue
                question, answer = question.strip(), answer.strip()
                if question and answer:
                    records.append((f"{path.stem}:{c_index}:{turn}", question, answer))
    return tuple(records)


def chat_records() -> list[tuple[str, str, str]]:
    """``(id, question, answer)``; parsed once per process."""
    return list(_chat_records_cached(str(_chatterbot_english_dir())))


def chat_pairs() -> list[tuple[str, str]]:
    """English chatterbot-corpus ``(question, answer)`` pairs (2,306 for version 1.3.3).

    Rule: each conversation (a list of turns) gives one pair per consecutive turns ``(t[i],
    t[i+1])``, so every turn answers the previous one; a 2-turn conversation gives one pair.
    Non-string or empty turns and non-list conversations are skipped. Order: files sorted by name,
    then file order.
    """
    return [(q, a) for _, q, a in chat_records()]
