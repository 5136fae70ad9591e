"""Calibration / training examples: offline aliases, user files and hub sets, and sampling.

Aliases (real human-labelled data from PyPI packages, see :data:`CALIB_ALIASES` and
:mod:`.corpora`):

* ``movie`` / ``tweets``: VADER ground truth (Hutto & Gilbert, ICWSM 2014), Rotten Tomatoes
  snippets / tweets with a mean human sentiment in [-4, 4]; label 1 if the score is > 0, 0 if < 0,
  score-0 rows dropped. ``movie-score`` / ``tweets-score`` keep every row with the score itself as a
  regression label. The files come from the vaderSentiment 3.3.2 source tarball (the wheel lacks
  them), fetched once by ``senslora fetch`` (scripts/setup.sh runs it) into ``<cache>/data/vader``,
  SHA-256 checked; nothing is downloaded at run time.
* ``chat``: question -> answer pairs from chatterbot-corpus 1.3.3 (English), as prompt/answer
  examples for causal LMs.

User data: ``.txt`` (one example per non-empty line), ``.csv`` / ``.tsv`` (header row), ``.jsonl`` /
``.json`` (JSON lines or one JSON array of objects), ``.parquet``, a folder written by ``datasets``'
``save_to_disk`` (a ``DatasetDict`` uses its ``train`` split, or its only split), or
``hf:NAME[:CONFIG][:SPLIT]`` (``datasets.load_dataset``, split ``train`` by default; needs network
access). Files and folders are read by :mod:`.readers`, the reader tasks use too. Rows are in one
of the formats of :mod:`.formats` (TRL's text, messages, prompt-completion, preference; alpaca and
ShareGPT), detected from the columns or given as ``data_format``.

Tokenised batches (:func:`make_batches`) live in :mod:`.batches`; they and the corpora functions
are importable from here as well (see ``__all__``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import SensloraError
from .batches import BATCH_KINDS, bos_prefix, make_batches, pad_rows, padding_id, prompt_ids, prompt_text
from .corpora import (
    FETCH_HINT,
    VADER_SDIST,
    VADER_SDIST_SHA256,
    VADER_SETS,
    VADER_VERSION,
    chat_pairs,
    chat_records,
    fetch_vader,
    vader_dir,
    vader_records,
)
from .formats import CHAT_FORMATS, DATA_FORMATS, chat_examples, detect_format, read_columns
from .readers import (
    Records,
    dataset_records,
    load_disk,
    load_hub,
    read_csv,
    read_json,
    read_parquet,
    read_text_file,
)
from .schema import Example  # re-exported: the example record, defined below the readers and batches

# Names defined in .batches / .corpora / .readers, importable from here as before.
__all__ = [
    "BATCH_KINDS",
    "CALIB_ALIASES",
    "FETCH_HINT",
    "MISSING_SPELLINGS",
    "VADER_SDIST",
    "VADER_SDIST_SHA256",
    "VADER_SETS",
    "VADER_VERSION",
    "Example",
    "bos_prefix",
    "calibration_batches",
    "calibration_sample",
    "chat_pairs",
    "check_label_cells",
    "check_label_leak",
    "check_text_cells",
    "check_text_columns",
    "drop_empty_texts",
    "fetch_vader",
    "is_missing",
    "load_examples",
    "make_batches",
    "name_rows",
    "pad_rows",
    "padding_id",
    "prompt_ids",
    "prompt_text",
    "read_text_file",
    "sample_examples",
    "vader_dir",
    "vader_records",
]

logger = logging.getLogger(__name__)


CALIB_ALIASES: dict[str, str] = {
    "movie": "VADER movieReviewSnippets: 10,605 Rotten Tomatoes sentences; label = score > 0 (score-0 rows dropped)",
    "tweets": "VADER tweets: 4,200 tweets; label = score > 0 (score-0 rows dropped)",
    "movie-score": "VADER movieReviewSnippets with the mean human sentiment in [-4, 4] as a regression label",
    "tweets-score": "VADER tweets with the mean human sentiment in [-4, 4] as a regression label",
    "chat": "chatterbot-corpus (English): question -> answer pairs for causal LMs",
}

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


def _shown_text(ex: Example) -> str:
    """What must not be empty: a conversation's turns, a pair's prompt, else the text."""
    return ex.prompt if ex.prompt is not None and ex.messages is None else ex.text
def check_text_columns(text: str | None, pair: str | None, label: str | None, where: str) -> None:
    """The label column is never a text column: the model would read the answer it must predict."""
    for column, flag in ((text, "--text-column"), (pair, "--text-pair-column")):
        if label is not None and column == label:
            raise SensloraError(
                f"{where}: {flag} and --label-column are both {label!r}, so the model would read the answer it "
                f"must predict; name the column that holds the texts with {flag}"
            )


def check_text_cells(cells: Sequence[tuple[Any, Any]], where: str, column: str) -> None:
    """Refuse texts that are a list, an object or true/false, naming the rows (as labels of that
    shape are refused); numbers are read as text. ``cells``: ``(row, value)`` pairs of one column."""
    nested = [row for row, value in cells if isinstance(value, (list, dict, tuple, bool))]
    if nested:
        raise SensloraError(
            f"{where}: text column {column!r} holds a list, an object or true/false in {name_rows(nested)}; "
            "each text must be a string; fix those rows or choose another --text-column"
        )


def _same_text(text: Any, label: Any) -> bool:
    if label is None or isinstance(label, (list, dict, tuple)):
        return False
    shown = str(text).strip().casefold()
    return bool(shown) and shown == str(label).strip().casefold()


def check_label_leak(rows: Sequence[tuple[Any, Any, Any]], where: str, column: str, *, allow: bool) -> None:
    """Texts that equal their label (stripped, case-folded) in most rows: the text column is a copy
    of the labels and the model would read the answer. An error naming the rows, or with ``allow``
    (``--allow-label-text``) a warning. ``rows``: ``(row, text, label)``."""
    same = [row for row, text, label in rows if _same_text(text, label)]
    if not rows or len(same) * 2 <= len(rows):
        return
    message = (
        f"{where}: the text equals its label in {len(same)} of {len(rows)} rows ({name_rows(same)}), so the "
        f"model would read the answer (is text column {column!r} a copy of the labels?)"
    )
    if allow:
        logger.warning("%s; going on as --allow-label-text asks", message)
        return
    raise SensloraError(f"{message}; choose the text column with --text-column, or pass --allow-label-text")


def drop_empty_texts(examples: list[Example], where: str) -> list[Example]:
    """``examples`` without those whose text (prompt, for generation data) is empty, with a warning
    giving their count; an error when every text is empty."""
    kept = [ex for ex in examples if _shown_text(ex).strip()]
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
        check_text_columns(self.text, self.text_pair, self.label, "the calibration data")
        check_text_columns(self.prompt, None, self.answer, "the calibration data")
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


def _check_columns(present: Sequence[str], cols: _Columns, where: str) -> None:
    for column, role in cols.required():
        if column not in present:
            raise _err_columns(where, column, role, present)


def _format_of(columns: Sequence[str], cols: _Columns, data_format: str, where: str) -> str:
    """The data format of rows with ``columns`` (:func:`.formats.detect_format`). Columns of the
    text format named (prompt / answer, a label, a second text, a text column other than
    ``text``) make ``auto`` the text format. The chat formats have no label or second-text column."""
    named = (cols.prompt, cols.label, cols.text_pair)
    if data_format == "auto" and (any(c is not None for c in named) or cols.text != "text"):
        return "text"
    fmt = detect_format(columns, data_format, text_column=cols.text, where=where)
    if fmt in CHAT_FORMATS and (cols.label is not None or cols.text_pair is not None):
        what, flag = ("label", "--label-column") if cols.label is not None else ("second text", "--text-pair-column")
        raise SensloraError(f"{where} is in the {fmt} format, which has no {what} column; drop {flag}")
    return fmt


def _records_examples(records: Records, cols: _Columns, where: str, data_format: str = "auto") -> list[Example]:
    """Examples of rows read by :mod:`.readers` (ids ``0``, ``1``, ... in row order). An empty file
    (no column, no row) gives none; otherwise the format is detected and its columns checked first."""
    if records.empty:
        return []
    fmt = _format_of(records.columns, cols, data_format, where)
    if fmt in CHAT_FORMATS:
        return chat_examples(records.rows, records.places, fmt, where)
    _check_columns(records.columns, cols, where)
    rows = enumerate(zip(records.rows, records.places, strict=True))
    return [_row_example(row, cols, f"{where} {place}", str(i)) for i, (row, place) in rows]


def _load_txt(path: Path) -> list[Example]:
    lines = read_text_file(path).split("\n")
    return [Example(text=line.strip(), id=str(i)) for i, line in enumerate(lines) if line.strip()]


def _dataset_examples(ds: Any, cols: _Columns, where: str, data_format: str) -> list[Example]:
    fmt = _format_of(list(ds.column_names), cols, data_format, where)  # before reading any row
    if fmt in CHAT_FORMATS:
        read = read_columns(fmt)
    else:
        _check_columns(list(ds.column_names), cols, where)
        read = [c for c, _ in cols.required()]
    return _records_examples(dataset_records(ds, read), cols, where, fmt)


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


def _load_disk(path: Path, cols: _Columns, data_format: str) -> list[Example]:
    from datasets import DatasetDict

    ds = load_disk(path)
    if isinstance(ds, DatasetDict):
        ds = _pick_split(ds, None, str(path))
    return _dataset_examples(ds, cols, str(path), data_format)


def _load_hub(spec: str, cols: _Columns, data_format: str) -> list[Example]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise SensloraError(
            f"hub data set spec {spec!r} must look like hf:NAME[:CONFIG][:SPLIT], e.g. hf:glue:sst2:validation"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    ds = load_hub(name, config, split, what=f"hub data set {spec!r}", instead="the folder")
    return _dataset_examples(ds, cols, spec, data_format)


def _alias_examples(alias: str) -> list[Example]:
    if alias == "chat":
        return [
            Example(text=f"{q}\n{a}", prompt=q, answer=a, id=f"chat:{rid}") for rid, q, a in chat_records()
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
    data_format: str = "auto",
) -> list[Example]:
    """Examples from an alias (:data:`CALIB_ALIASES`), a file or folder, or ``hf:NAME[:CONFIG][:SPLIT]``.

    Column arguments apply to files, folders and hub sets (aliases ignore them). Labels are read
    as numbers (numeric strings are converted); without ``label_column`` examples carry no label.
    With ``prompt_column`` and ``answer_column`` the examples are generation pairs (``text`` is
    ignored). ``data_format``: one of the formats of :mod:`.formats` (``text``, ``messages``,
    ``prompt-completion``, ``preference``, ``sharegpt``, ``alpaca``), or ``auto`` to detect it from
    the columns. Raises :class:`SensloraError` for anything unreadable or an empty result.
    """
    name = os.fspath(spec)
    cols = _Columns(text_column, text_pair_column, label_column, prompt_column, answer_column)
    cols.required()  # validates the prompt/answer combination early
    if data_format not in DATA_FORMATS:
        raise SensloraError(f"unknown data format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
    if name in CALIB_ALIASES:
        examples = _alias_examples(name)
    elif name.startswith("hf:"):
        examples = _load_hub(name, cols, data_format)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            examples = _load_disk(path, cols, data_format)
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".txt":
                if label_column is not None or text_pair_column is not None or prompt_column is not None:
                    raise SensloraError(
                        f"{path}: a .txt file has one text per line and no columns; use CSV or JSONL"
                    )
                if data_format in CHAT_FORMATS:
                    raise SensloraError(
                        f"{path}: a .txt file holds one text per line, not the {data_format} format; use JSONL"
                    )
                examples = _load_txt(path)
            elif suffix in (".csv", ".tsv"):
                examples = _records_examples(read_csv(path), cols, str(path), data_format)
            elif suffix in (".jsonl", ".json"):
                examples = _records_examples(read_json(path), cols, str(path), data_format)
            elif suffix == ".parquet":
                examples = _records_examples(read_parquet(path), cols, str(path), data_format)
            else:
                raise SensloraError(
                    f"unsupported data file type {suffix or '(none)'!r} for {path}; use .txt, .csv, .tsv, .jsonl, "
                    ".json, .parquet or a folder saved with datasets' save_to_disk"
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


def calibration_sample(
    calib: str | os.PathLike[str],
    *,
    samples: int | None,
    seed: int,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = None,
    data_format: str = "auto",
) -> tuple[list[Example], int]:
    """The seeded sample of ``samples`` examples of ``calib`` that calibration uses (:func:`load_examples`,
    :func:`sample_examples`), and how many examples ``calib`` holds."""
    examples = load_examples(
        calib,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        data_format=data_format,
    )
    return sample_examples(examples, samples, seed), len(examples)


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
    data_format: str = "auto",
    init: str = "zero",
) -> list[dict[str, Any]]:
    """Seeded calibration sample of ``calib`` (``samples`` examples), tokenised into padded batches.

    For a classification or regression model, an estimator that needs the task loss (its
    ``needs_labels``: all but ``activation``), or an ``init`` that does (``gradient``, ``lora-ga``),
    needs every example labelled. ``init`` is the one the user named: the preset's own falls back to
    zero on unlabelled batches instead (:func:`senslora.core.pipeline.allocate`). The messages name the ``senslora allocate`` flags (``--max-length``, ``--label-column``,
    ``--estimator``) that set these values.
    """
    if max_length < 8:
        raise SensloraError(f"--max-length must be at least 8, got {max_length}")
    examples, _ = calibration_sample(
        calib,
        samples=samples,
        seed=seed,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        data_format=data_format,
    )
    from ..core.estimators import ESTIMATORS  # imports torch: not at module level
    from ..core.inits import NEEDS_LABELS

    if estimator not in ESTIMATORS or ESTIMATORS[estimator].needs_labels:
        who, fix = f"estimator {estimator}", "use --estimator activation"
    elif init in NEEDS_LABELS:
        who, fix = f"--init {init}", "use --init zero (PEFT's, no labels needed)"
    else:
        who = None
    if kind in ("classification", "regression") and who is not None:
        if any(e.label is None for e in examples):
            raise SensloraError(
                f"{who} needs labelled calibration data for a {kind} model; pass --label-column or {fix}"
            )
    return make_batches(examples, tokenizer, kind=kind, max_length=max_length, batch_size=batch_size)
