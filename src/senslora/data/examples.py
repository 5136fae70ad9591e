"""Calibration / training data: offline aliases, user files, and tokenised batches.

Aliases (real human-labelled data from PyPI packages, see :data:`CALIB_ALIASES`):

* ``movie`` / ``tweets``: VADER ground truth (Hutto & Gilbert, ICWSM 2014), Rotten Tomatoes
  snippets / tweets with a mean human sentiment in [-4, 4]; label 1 if the score is > 0, 0 if < 0,
  score-0 rows dropped. ``movie-score`` / ``tweets-score`` keep every row with the score itself as a
  regression label. The files come from the vaderSentiment 3.3.2 source tarball (the wheel lacks
  them), fetched once by ``senslora fetch`` (scripts/setup.sh runs it) into ``<cache>/data/vader``,
  SHA-256 checked; nothing is downloaded at run time.
* ``chat``: question -> answer pairs from chatterbot-corpus 1.3.3 (English), as prompt/answer
  examples for causal LMs.

User data: ``.txt`` (one example per non-empty line), ``.csv`` / ``.tsv`` (header row), ``.jsonl`` /
``.json`` (JSON lines or one JSON array of objects), a folder written by ``datasets``'
``save_to_disk`` (a ``DatasetDict`` uses its ``train`` split), or ``hf:NAME[:CONFIG][:SPLIT]``
(``datasets.load_dataset``; needs network access).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import io
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.cache import MANIFEST_NAME, atomic_dir, cache_dir, check_manifest, sha256_file, write_manifest
from ..core.errors import SensloraError

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One example. For generation data ``prompt``/``answer`` are set and ``text`` is
    ``prompt + "\\n" + answer``; :func:`make_batches` then puts the loss on the answer only."""

    text: str
    text_pair: str | None = None
    label: float | int | None = None
    prompt: str | None = None
    answer: str | None = None
    id: str = ""


CALIB_ALIASES: dict[str, str] = {
    "movie": "VADER movieReviewSnippets: 10,605 Rotten Tomatoes sentences; label = score > 0 (score-0 rows dropped)",
    "tweets": "VADER tweets: 4,200 tweets; label = score > 0 (score-0 rows dropped)",
    "movie-score": "VADER movieReviewSnippets with the mean human sentiment in [-4, 4] as a regression label",
    "tweets-score": "VADER tweets with the mean human sentiment in [-4, 4] as a regression label",
    "chat": "chatterbot-corpus (English): question -> answer pairs for causal LMs",
}
BATCH_KINDS = ("classification", "regression", "causal-lm", "base")

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


def _chat_records() -> list[tuple[str, str, str]]:
    """``(id, question, answer)``; parsed once per process."""
    return list(_chat_records_cached(str(_chatterbot_english_dir())))


def chat_pairs() -> list[tuple[str, str]]:
    """English chatterbot-corpus ``(question, answer)`` pairs (2,306 for version 1.3.3).

    Rule: each conversation (a list of turns) gives one pair per consecutive turns ``(t[i],
    t[i+1])``, so every turn answers the previous one; a 2-turn conversation gives one pair.
    Non-string or empty turns and non-list conversations are skipped. Order: files sorted by name,
    then file order.
    """
    return [(q, a) for _, q, a in _chat_records()]


# ------------------------------------------------------------------------------------ user files
def _err_columns(where: str, column: str, role: str, present: Sequence[str]) -> SensloraError:
    shown = ", ".join(repr(c) for c in present) or "none"
    return SensloraError(f"{where} has no {role} column {column!r}; columns present: {shown}")


def _to_text(value: Any, where: str, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise SensloraError(f"{where}: column {column!r} must hold text, found {type(value).__name__} {value!r}")


# Spellings of a missing value in a label cell (compared stripped and lower-cased).
MISSING_SPELLINGS = ("", "nan", "none", "null")


def is_missing(value: Any) -> bool:
    """Whether a label cell holds no value: None, a float NaN, or a string spelling one."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in MISSING_SPELLINGS


def name_rows(rows: Sequence[Any], limit: int = 5) -> str:
    """``rows 3, 7, 9`` (the first ``limit``, then how many more)."""
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def check_label_cells(cells: Sequence[tuple[Any, Any]], where: str, column: str) -> None:
    """Refuse missing values (:data:`MISSING_SPELLINGS`) and list / dict labels, naming the rows.

    ``cells``: ``(row, value)`` pairs of one label column."""
    missing = [row for row, value in cells if is_missing(value)]
    if missing:
        verb = "have" if len(missing) > 1 else "has"
        raise SensloraError(
            f"{where}: {name_rows(missing)} {verb} no label in column {column!r} (empty, NaN, None or null); "
            "fill those labels in or remove the rows"
        )
    nested = [row for row, value in cells if isinstance(value, (list, dict, tuple))]
    if nested:
        raise SensloraError(
            f"{where}: label column {column!r} holds a list or an object in {name_rows(nested)}; each label "
            "must be one number or one class name"
        )


def drop_empty_texts(examples: list[Example], where: str) -> list[Example]:
    """``examples`` without those whose text (prompt, for generation data) is empty, with a warning
    giving their count; an error when every text is empty."""
    kept = [ex for ex in examples if (ex.prompt if ex.prompt is not None else ex.text).strip()]
    dropped = len(examples) - len(kept)
    if examples and not kept:
        raise SensloraError(f"every text of {where} is empty; check the text column (--text-column)")
    if dropped:
        logger.warning("%s: dropped %d of %d examples with an empty text", where, dropped, len(examples))
    return kept


def _to_label(value: Any, where: str, column: str) -> float | int:
    if is_missing(value):
        raise SensloraError(
            f"{where}: label column {column!r} is empty or missing ({value!r}); fill the label in or remove the row"
        )
    if isinstance(value, (list, dict, tuple)):
        raise SensloraError(
            f"{where}: label column {column!r} holds a {type(value).__name__}; a label must be one number"
        )
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        s = value.strip()
        try:
            return int(s)
        except ValueError:
            pass
        try:
            number = float(s)
        except ValueError:
            number = math.nan
        if not math.isnan(number):
            return number
        raise SensloraError(
            f"{where}: label {value!r} in column {column!r} is not a number; labels must be integers "
            "0..K-1 (classification) or numbers (regression)"
        )
    raise SensloraError(
        f"{where}: label column {column!r} holds {type(value).__name__} {value!r}, not a number"
    )


@dataclass(frozen=True)
class _Columns:
    text: str
    text_pair: str | None
    label: str | None
    prompt: str | None
    answer: str | None

    def required(self) -> list[tuple[str, str]]:
        if self.prompt is not None or self.answer is not None:
            if self.prompt is None or self.answer is None:
                raise SensloraError("give both a prompt column and an answer column, or neither")
            cols = [(self.prompt, "prompt"), (self.answer, "answer")]
        else:
            cols = [(self.text, "text")]
            if self.text_pair is not None:
                cols.append((self.text_pair, "text-pair"))
        if self.label is not None:
            cols.append((self.label, "label"))
        return cols


def _row_example(row: dict[str, Any], cols: _Columns, where: str, row_id: str) -> Example:
    for column, role in cols.required():
        if column not in row:
            raise _err_columns(where, column, role, list(row))
    label = _to_label(row[cols.label], where, cols.label) if cols.label is not None else None
    if cols.prompt is not None and cols.answer is not None:
        prompt = _to_text(row[cols.prompt], where, cols.prompt)
        answer = _to_text(row[cols.answer], where, cols.answer)
        return Example(text=f"{prompt}\n{answer}", label=label, prompt=prompt, answer=answer, id=row_id)
    text = _to_text(row[cols.text], where, cols.text)
    pair = _to_text(row[cols.text_pair], where, cols.text_pair) if cols.text_pair is not None else None
    return Example(text=text, text_pair=pair, label=label, id=row_id)


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SensloraError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise SensloraError(f"cannot read {path} ({exc.strerror or exc})") from exc


def _load_txt(path: Path) -> list[Example]:
    lines = _read_text_file(path).split("\n")
    return [Example(text=line.strip(), id=str(i)) for i, line in enumerate(lines) if line.strip()]


def _load_csv(path: Path, cols: _Columns, delimiter: str) -> list[Example]:
    text = _read_text_file(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise SensloraError(
            f"{path} is not valid {'TSV' if delimiter == chr(9) else 'CSV'} (line {reader.line_num}: {exc})"
        ) from exc
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        raise SensloraError(f"{path} has duplicate column names in its header: {', '.join(header)}")
    for column, role in cols.required():
        if column not in header:
            raise _err_columns(str(path), column, role, header)
    examples = []
    for i, row in enumerate(rows[1:], start=1):
        if len(row) != len(header):
            raise SensloraError(
                f"{path} is malformed: data row {i} has {len(row)} fields but the header has {len(header)}"
            )
        examples.append(
            _row_example(dict(zip(header, row, strict=True)), cols, f"{path} row {i}", str(i - 1))
        )
    return examples


def _load_json(path: Path, cols: _Columns) -> list[Example]:
    text = _read_text_file(path)
    records: list[tuple[int, Any]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SensloraError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        records = list(enumerate(data, start=1))
        unit = "item"
    else:
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise SensloraError(
                    f"{path} line {lineno} is not valid JSON ({exc.msg}); expected one object per line"
                ) from exc
        unit = "line"
    examples = []
    for n, (where_no, obj) in enumerate(records):
        where = f"{path} {unit} {where_no}"
        if not isinstance(obj, dict):
            raise SensloraError(f"{where} is a {type(obj).__name__}, expected a JSON object")
        examples.append(_row_example(obj, cols, where, str(n)))
    return examples


def _dataset_examples(ds: Any, cols: _Columns, where: str) -> list[Example]:
    present = list(ds.column_names)
    for column, role in cols.required():
        if column not in present:
            raise _err_columns(where, column, role, present)
    needed = [c for c, _ in cols.required()]
    data = {c: ds[c] for c in needed}
    return [
        _row_example({c: data[c][i] for c in needed}, cols, f"{where} row {i}", str(i))
        for i in range(len(ds))
    ]


def _pick_split(dsdict: Any, split: str | None, where: str) -> Any:
    splits = list(dsdict.keys())
    if split is None:
        if "train" in splits:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise SensloraError(f"{where} has no 'train' split; splits present: {', '.join(splits)}")
    if split not in splits:
        raise SensloraError(f"{where} has no split {split!r}; splits present: {', '.join(splits)}")
    return dsdict[split]


def _load_disk(path: Path, cols: _Columns) -> list[Example]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise SensloraError(
            f"{path} is a folder but not a data set saved with datasets' save_to_disk ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from exc
    if isinstance(ds, DatasetDict):
        ds = _pick_split(ds, None, str(path))
    return _dataset_examples(ds, cols, str(path))


def _load_hub(spec: str, cols: _Columns) -> list[Example]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise SensloraError(
            f"hub data set spec {spec!r} must look like hf:NAME[:CONFIG][:SPLIT], e.g. hf:glue:sst2:validation"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing data set, bad config or split: all user-fixable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SensloraError(
            f"cannot load hub data set {spec!r} ({type(exc).__name__}: {first}); this needs network access, "
            "or save it with save_to_disk where there is network and pass the folder"
        ) from exc
    return _dataset_examples(ds, cols, spec)


def _alias_examples(alias: str) -> list[Example]:
    if alias == "chat":
        return [
            Example(text=f"{q}\n{a}", prompt=q, answer=a, id=f"chat:{rid}") for rid, q, a in _chat_records()
        ]
    stem = "movieReviewSnippets" if alias.startswith("movie") else "tweets"
    rows = vader_records(stem)
    if alias.endswith("-score"):
        return [Example(text=text, label=score, id=f"{alias}:{rid}") for rid, score, text in rows]
    return [
        Example(text=text, label=int(score > 0), id=f"{alias}:{rid}")
        for rid, score, text in rows
        if score != 0
    ]


def load_examples(
    spec: str | os.PathLike[str],
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = None,
    prompt_column: str | None = None,
    answer_column: str | None = None,
) -> list[Example]:
    """Examples from an alias (:data:`CALIB_ALIASES`), a file or folder, or ``hf:NAME[:CONFIG][:SPLIT]``.

    Column arguments apply to files, folders and hub sets (aliases ignore them). Labels are read
    as numbers (numeric strings are converted); without ``label_column`` examples carry no label.
    With ``prompt_column`` and ``answer_column`` the examples are generation pairs (``text`` is
    ignored). Raises :class:`SensloraError` for anything unreadable or an empty result.
    """
    name = os.fspath(spec)
    cols = _Columns(text_column, text_pair_column, label_column, prompt_column, answer_column)
    cols.required()  # validates the prompt/answer combination early
    if name in CALIB_ALIASES:
        examples = _alias_examples(name)
    elif name.startswith("hf:"):
        examples = _load_hub(name, cols)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            examples = _load_disk(path, cols)
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".txt":
                if label_column is not None or text_pair_column is not None or prompt_column is not None:
                    raise SensloraError(
                        f"{path}: a .txt file has one text per line and no columns; use CSV or JSONL"
                    )
                examples = _load_txt(path)
            elif suffix in (".csv", ".tsv"):
                examples = _load_csv(path, cols, "\t" if suffix == ".tsv" else ",")
            elif suffix in (".jsonl", ".json"):
                examples = _load_json(path, cols)
            else:
                raise SensloraError(
                    f"unsupported data file type {suffix or '(none)'!r} for {path}; use .txt, .csv, .tsv, .jsonl, "
                    ".json or a folder saved with datasets' save_to_disk"
                )
        else:
            raise SensloraError(
                f"calibration set {name!r} is neither a known alias ({', '.join(CALIB_ALIASES)}), nor an existing "
                "file or folder, nor hf:NAME[:CONFIG][:SPLIT]"
            )
    if not examples:
        raise SensloraError(f"calibration set {name!r} is empty")
    return drop_empty_texts(examples, f"calibration set {name!r}")


def sample_examples(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """``n`` examples picked by a seeded permutation (in that shuffled order); all, in order, if
    ``n`` is ``None`` or ``>= len(examples)``."""
    if n is None or n >= len(examples):
        return list(examples)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SensloraError(f"the number of examples must be a positive integer, got {n!r}")
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(examples))[:n]
    return [examples[int(i)] for i in order]


# --------------------------------------------------------------------------------------- batches
def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The text a causal LM sees before its answer, exactly as :func:`make_batches` builds it:
    the chat template of one user turn with the generation prompt, else ``prompt + "\\n"``.

    Tokenise it with ``add_special_tokens=False`` after :func:`bos_prefix` (template text already
    holds its own special tokens, so no prefix is added then)."""
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def bos_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before a text (e.g. BOS), empty if none."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _causal_ids(ex: Example, tokenizer: Any, max_length: int, prefix: list[int]) -> tuple[list[int], int]:
    """Token ids of a causal-LM example and how many leading ones are prompt (no loss)."""
    eos = tokenizer.eos_token_id
    if ex.prompt is None or ex.answer is None:
        ids = prefix + _encode(tokenizer, ex.text)
        if eos is not None:
            ids.append(eos)
        return ids[:max_length], 0
    if _has_chat_template(tokenizer):
        p_text = prompt_text(tokenizer, ex.prompt)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}],
            tokenize=False,
        )
        a_text = full[len(p_text) :].rstrip() if full.startswith(p_text) else ex.answer
        p_ids = _encode(tokenizer, p_text)
    else:
        p_ids = prefix + _encode(tokenizer, prompt_text(tokenizer, ex.prompt))
        a_text = ex.answer
    a_ids = _encode(tokenizer, a_text)
    if eos is not None and (not a_ids or a_ids[-1] != eos):
        a_ids.append(eos)
    if len(p_ids) + len(a_ids) > max_length:
        # The answer keeps everything the prompt leaves, but at least min(len, max_length // 2)
        # tokens; the prompt is cut from the left so that its end (the generation cue) survives.
        a_keep = max(max_length - len(p_ids), min(len(a_ids), max_length // 2))
        a_ids = a_ids[:a_keep]
        p_ids = p_ids[len(p_ids) - (max_length - len(a_ids)) :] if max_length > len(a_ids) else []
    return p_ids + a_ids, len(p_ids)


def _class_label(label: float | int, ex: Example) -> int:
    value = float(label)
    if not value.is_integer() or value < 0:
        hint = " (GLUE test splits hide their labels as -1; use the validation split)" if value == -1 else ""
        raise SensloraError(
            f"example {ex.id or '?'} has label {label!r}; classification labels must be integers >= 0{hint} "
            "(use regression for real-valued labels)"
        )
    return int(value)


def _within_positions(tokenizer: Any, max_length: int) -> int:
    """``max_length``, or the tokenizer's ``model_max_length`` (set to the model's positions by
    :func:`senslora.data.models.load_model`) when that is smaller, with a warning once per tokenizer."""
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit >= max_length:
        return max_length
    warned = getattr(tokenizer, "_senslora_warned", set())
    if (limit, max_length) not in warned:
        logger.warning(
            "--max-length %d exceeds the model's %d positions; texts are truncated to %d tokens",
            max_length,
            limit,
            limit,
        )
        with contextlib.suppress(AttributeError, TypeError):
            tokenizer._senslora_warned = warned | {(limit, max_length)}
    return limit


def make_batches(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    kind: str,
    max_length: int = 128,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Tokenise ``examples`` (in order) into padded batches of tensors.

    Each batch has ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` when the tokenizer gives
    them, encoder kinds only), padded on the right to the longest sequence of the batch, truncated
    at ``max_length`` tokens, and ``labels``:

    * ``classification``: ``LongTensor (B,)``; ``regression``: ``FloatTensor (B,)``. If no example
      has a label there is no ``labels`` key; a mix of labelled and unlabelled is an error.
    * ``causal-lm``: the input ids with -100 on padding and, for prompt/answer examples, on the
      prompt tokens (loss on the answer only). Text is ``prompt_text(tokenizer, prompt)`` + answer
      (chat template when the tokenizer has one) and ends with EOS.
    * ``base``: no labels.
    """
    import torch

    if kind not in BATCH_KINDS:
        raise SensloraError(f"batch kind {kind!r} is not supported; use one of {', '.join(BATCH_KINDS)}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
        raise SensloraError(f"max_length must be an integer >= 8, got {max_length!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SensloraError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not examples:
        raise SensloraError("no examples to batch")
    max_length = _within_positions(tokenizer, max_length)

    with_labels = kind in ("classification", "regression")
    if with_labels:
        labelled = sum(ex.label is not None for ex in examples)
        if 0 < labelled < len(examples):
            raise SensloraError(
                f"{len(examples) - labelled} of {len(examples)} examples have no label; label all of them or none"
            )
        with_labels = labelled > 0

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    prefix = bos_prefix(tokenizer) if kind == "causal-lm" else []

    batches: list[dict[str, Any]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        seqs: list[list[int]] = []
        types: list[list[int]] | None = []
        n_prompt: list[int] = []
        for ex in chunk:
            if kind == "causal-lm":
                ids, n_p = _causal_ids(ex, tokenizer, max_length, prefix)
                seqs.append(ids)
                n_prompt.append(n_p)
                types = None
            else:
                enc = tokenizer(ex.text, ex.text_pair, truncation=True, max_length=max_length)
                seqs.append(list(enc["input_ids"]))
                tt = enc.get("token_type_ids")
                if types is not None and tt is not None:
                    types.append(list(tt))
                else:
                    types = None
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[row, : len(seq)] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
        if types:
            token_types = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, tt in enumerate(types):
                token_types[row, : len(tt)] = torch.tensor(tt, dtype=torch.long)
            batch["token_type_ids"] = token_types
        if kind == "causal-lm":
            labels = input_ids.clone()
            labels[attention == 0] = -100
            for row, n_p in enumerate(n_prompt):
                labels[row, :n_p] = -100
            batch["labels"] = labels
        elif with_labels and kind == "classification":
            batch["labels"] = torch.tensor([_class_label(ex.label, ex) for ex in chunk], dtype=torch.long)
        elif with_labels:
            batch["labels"] = torch.tensor([float(ex.label) for ex in chunk], dtype=torch.float32)
        batches.append(batch)
    return batches


def calibration_batches(
    calib: str | os.PathLike[str],
    tokenizer: Any,
    kind: str,
    *,
    samples: int | None,
    seed: int,
    max_length: int,
    batch_size: int,
    estimator: str,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = None,
) -> list[dict[str, Any]]:
    """Seeded calibration sample of ``calib`` (``samples`` examples), tokenised into padded batches.

    The messages name the ``senslora allocate`` flags (``--max-length``, ``--label-column``,
    ``--estimator``) that set these values.
    """
    if max_length < 8:
        raise SensloraError(f"--max-length must be at least 8, got {max_length}")
    examples = load_examples(
        calib,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
    )
    examples = sample_examples(examples, samples, seed)
    if kind in ("classification", "regression") and estimator not in ("activation",):
        if any(e.label is None for e in examples):
            raise SensloraError(
                f"estimator {estimator} needs labelled calibration data for a {kind} model; pass --label-column or use --estimator activation"
            )
    return make_batches(examples, tokenizer, kind=kind, max_length=max_length, batch_size=batch_size)
