"""Tasks: a labelled data set with fixed train/validation/test splits, a problem type and metrics.

Built-in tasks (:data:`TASKS`; real human-labelled data from PyPI packages, see ``senslora.data.examples``):

* ``movie-polarity``: VADER Rotten Tomatoes snippets, label 1 if the mean human score is > 0 and
  0 if < 0 (score-0 rows dropped); a stand-in for SST-2.
* ``movie-score``: the same snippets with the mean score in [-4, 4] as a regression target.
* ``tweet-polarity``: VADER tweets, labelled like ``movie-polarity``.
* ``chat-qa``: chatterbot-corpus question -> answer pairs for causal LMs (loss on the answer only).

Generic tasks: ``csv:PATH`` (``.tsv`` is read tab-separated), ``jsonl:PATH`` (JSON lines or one
JSON array), ``parquet:PATH``, ``disk:PATH`` (``datasets``' ``save_to_disk``) with ``text_column`` /
``text_pair_column`` / ``label_column`` / ``problem``; for ``generation`` the text column is the
prompt and the label column the answer. Rows in TRL's chat formats (:mod:`.formats`: a
``messages`` column, or ``prompt`` and ``completion`` columns; detected, or ``data_format``) are
generation tasks without a label column: the answer is a conversation's last assistant turn, or
the completion. Files and folders are read by :mod:`.readers`, as
calibration sets are. ``glue:NAME`` loads GLUE through ``datasets`` (network access, or its
cache); its columns are GLUE's own.

Splits: a data set without splits is shuffled by ``split_seed`` (independent of the training
seed, so every training seed sees the same test set) and cut 80/10/10 into train / validation /
test. A ``datasets`` folder keeps its own splits; a missing validation split is carved (10%,
seeded) out of train, and a missing or unlabelled test split (GLUE hides its test labels) is
replaced by the validation split, with a new validation split carved out of train.

Classification labels map to 0..C-1 deterministically: integer labels in numeric order, any other
labels as sorted strings. With the data's own splits the classes are the train split's and a label
outside them in another split is an error. Without ``problem`` a generic task is classification
unless a label is a non-integer number (then regression); a column mixing numbers and text, or
integer labels with a few (< 10%) fractional ones, is an error naming the rows, as are missing
labels, list labels, class names differing only in case or spaces (``loose_labels`` allows the
mixed column and merges the variants), and a class without a train example.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import SensloraError, name_items
from .examples import (
    Example,
    check_label_cells,
    check_label_leak,
    check_text_cells,
    check_text_columns,
    drop_empty_texts,
    load_examples,
    name_rows,
)
from .formats import CHAT_FORMATS, DATA_FORMATS, chat_examples, detect_format
from .guard import DATA_PREFIXES, check_input_file
from .readers import Records, dataset_records, load_disk, load_hub, read_csv, read_json, read_parquet

PROBLEMS = ("classification", "regression", "generation")
# Metrics of each problem (compute_metrics' names plus evaluate_model's eval_loss) and the primary one.
PROBLEM_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "matthews", "eval_loss"),
    "regression": ("pearson", "spearman", "eval_loss"),
    "generation": ("bleu", "rouge1", "rouge2", "rougeL", "eval_loss"),
}
PRIMARY_METRIC = {"classification": "accuracy", "regression": "pearson", "generation": "rougeL"}
MODEL_KINDS = {"classification": "classification", "regression": "regression", "generation": "causal-lm"}
_VALIDATION_NAMES = ("validation", "valid", "dev", "val")


@dataclass
class TaskData:
    """A task with its three splits."""

    name: str  # the task spec, e.g. movie-polarity or csv:data.csv
    problem: str  # classification | regression | generation
    num_labels: int  # classes (classification), 1 (regression), 0 (generation)
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    metrics: tuple[str, ...]  # the metrics evaluation reports
    primary_metric: str  # the one to compare runs by
    splits_seed: int  # seed of the 80/10/10 split (independent of the training seed)
    label_names: list[str] = field(default_factory=list)  # class index -> original label (classification)
    inferred: bool = False  # the problem was inferred from the labels (no --problem)
    data_format: str = "text"  # the rows' format (formats.py): text or one of the chat formats

    def describe(self) -> str:
        """What the labels are, e.g. ``classification, 3 classes: a, b, c``, ``regression`` or
        ``generation (messages format)``."""
        how = " (inferred from the labels)" if self.inferred else ""
        if self.data_format != "text":
            return f"{self.problem} ({self.data_format} format)"
        if self.problem != "classification":
            return self.problem + how
        names = ", ".join(self.label_names[:10]) + (", ..." if len(self.label_names) > 10 else "")
        return f"classification{how}, {self.num_labels} classes: {names}"

    @property
    def model_kind(self) -> str:
        """The model head this task needs: ``classification``, ``regression`` or ``causal-lm``."""
        return MODEL_KINDS[self.problem]

    def split_ids(self) -> dict[str, list[str]]:
        """Example ids of each split (what ``splits.json`` holds)."""
        return {name: [ex.id for ex in getattr(self, name)] for name in ("train", "validation", "test")}


# ------------------------------------------------------------------------------------- splitting
def _permutation(n: int, seed: int) -> list[int]:
    import numpy as np

    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def split_80_10_10(
    examples: Sequence[Example], seed: int, where: str
) -> tuple[list[Example], list[Example], list[Example]]:
    """Seeded shuffle, then 10% test, 10% validation, the rest train (each at least one example)."""
    n = len(examples)
    n_eval = n // 10
    if n_eval == 0:
        raise SensloraError(
            f"{where} has {n} examples; an 80/10/10 split needs at least 10 so that no split is empty"
        )
    order = _permutation(n, seed)
    test = [examples[i] for i in order[:n_eval]]
    validation = [examples[i] for i in order[n_eval : 2 * n_eval]]
    train = [examples[i] for i in order[2 * n_eval :]]
    return train, validation, test


def _carve_validation(train: list[Example], seed: int, where: str) -> tuple[list[Example], list[Example]]:
    n_val = len(train) // 10
    if n_val == 0:
        raise SensloraError(
            f"the train split of {where} has {len(train)} examples; carving a validation split needs at least 10"
        )
    order = _permutation(len(train), seed)
    return [train[i] for i in order[n_val:]], [train[i] for i in order[:n_val]]


# ------------------------------------------------------------------------------------- labels
def _int_label(value: Any) -> int | None:
    """``value`` as an int if it is an integer (int, integral float or integer string), else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            number = _float_label(value)
            return int(number) if number is not None and number.is_integer() else None
    return None


def _float_label(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _class_key(value: Any) -> int | str:
    as_int = _int_label(value)
    return as_int if as_int is not None else str(value).strip()


def _infer_problem(cells: Sequence[tuple[int, Any]], where: str, loose: bool) -> str:
    """Classification or regression from ``(row, label)`` cells, refusing a column that mixes
    numbers with text, or integer classes with a few fractional values (unless ``loose``)."""
    numeric = [(row, _float_label(v)) for row, v in cells]
    text = [row for row, x in numeric if x is None]
    if text and len(text) < len(numeric) and not loose:
        counts = f"{len(numeric) - len(text)} numbers, {len(text)} text values"
        raise SensloraError(
            f"{where}: the label column mixes numbers and text ({counts}; text in {name_rows(text)}); fix those "
            "rows, or pass --loose-labels to read every label as a class name"
        )
    if text:
        return "classification"
    fractional = [row for row, x in numeric if not x.is_integer()]
    if not fractional:
        return "classification"
    if len(fractional) * 10 < len(numeric) and not loose:
        raise SensloraError(
            f"{where}: the labels are integers except in {name_rows(fractional)}, so the task would be read as "
            "regression; fix those rows, or pass --problem regression (or --problem classification)"
        )
    return "regression"


def _rows_of(rows: list[tuple[str, int]]) -> str:
    return name_rows([f"{split} {n}".strip() if n else split for split, n in sorted(rows)], 3)


def _check_variants(examples: Sequence[Example], where: str, loose: bool) -> None:
    """Class names that differ only in case or surrounding spaces are an error (``loose``: merged
    into their most frequent spelling)."""
    spellings: dict[str, dict[str, list[str]]] = {}
    for ex in examples:
        if isinstance(ex.label, str) and _int_label(ex.label) is None:
            split, _, index = ex.id.rpartition(":")  # "12" or "train:12", 0-based
            row = (split, int(index) + 1) if index.isdigit() else (ex.id, 0)
            spellings.setdefault(ex.label.strip().casefold(), {}).setdefault(ex.label, []).append(row)
    for group in spellings.values():
        if len(group) < 2:
            continue
        if not loose:
            shown = "; ".join(f"{label!r} in {_rows_of(rows)}" for label, rows in group.items())
            raise SensloraError(
                f"{where}: labels differ only in case or spaces ({shown}); make them identical, or pass "
                "--loose-labels to merge them"
            )
        main = max(group, key=lambda label: (len(group[label]), label)).strip()
        for ex in examples:
            if isinstance(ex.label, str) and ex.label in group:
                ex.label = main


def _classes(labels: Sequence[Any], where: str) -> list[int | str]:
    keys = {_class_key(v) for v in labels}
    if all(isinstance(k, int) for k in keys):
        classes: list[int | str] = sorted(keys)
    else:
        classes = sorted(str(k) for k in keys)
    if len(classes) < 2:
        raise SensloraError(f"{where} has a single class ({classes[0]!r}); classification needs at least 2")
    return classes


def _map_classes(split: str, examples: list[Example], classes: list[int | str], where: str) -> None:
    strings = any(isinstance(c, str) for c in classes)
    index = {c: i for i, c in enumerate(classes)}
    for ex in examples:
        key = str(_class_key(ex.label)) if strings else _class_key(ex.label)
        if key not in index:
            shown = name_items([repr(c) for c in classes], 10)
            raise SensloraError(
                f"example {ex.id} of the {split} split of {where} has label {ex.label!r}, which is not one of "
                f"the task's classes ({shown}, from the train split)"
            )
        ex.label = index[key]


def _finish(
    name: str,
    problem: str,
    splits: dict[str, list[Example]],
    *,
    seed: int,
    classes_from_train: bool,
    loose: bool = False,
) -> TaskData:
    """Check the splits, map classification labels to 0..C-1 and build the :class:`TaskData`."""
    for split in ("train", "validation", "test"):
        if not splits[split]:
            raise SensloraError(f"the {split} split of {name} is empty")
    label_names: list[str] = []
    num_labels = 0
    if problem == "classification":
        _check_variants([ex for s in splits.values() for ex in s], name, loose)
        source = splits["train"] if classes_from_train else [ex for s in splits.values() for ex in s]
        classes = _classes([ex.label for ex in source], name)
        for split, examples in splits.items():
            _map_classes(split, examples, classes, name)
        absent = sorted(set(range(len(classes))) - {ex.label for ex in splits["train"]})
        if absent:
            shown = name_items([repr(classes[i]) for i in absent])
            raise SensloraError(
                f"{len(absent)} class(es) {shown} of {name} have no example in the train split (only in validation / test); "
                "add examples of them, remove them, or try another --split-seed"
            )
        label_names = [str(c) for c in classes]
        num_labels = len(classes)
    elif problem == "regression":
        num_labels = 1
        for split, examples in splits.items():
            for ex in examples:
                value = _float_label(ex.label)
                if value is None:
                    raise SensloraError(
                        f"example {ex.id} of the {split} split of {name} has label {ex.label!r}; regression needs finite numbers"
                    )
                ex.label = value
    return TaskData(
        name=name,
        problem=problem,
        num_labels=num_labels,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        metrics=PROBLEM_METRICS[problem],
        primary_metric=PRIMARY_METRIC[problem],
        splits_seed=seed,
        label_names=label_names,
    )


# ------------------------------------------------------------------------------------- built-in
def _alias_task(name: str, alias: str, problem: str) -> Callable[[int], TaskData]:
    def factory(split_seed: int) -> TaskData:
        examples = load_examples(alias)
        train, validation, test = split_80_10_10(examples, split_seed, name)
        splits = {"train": train, "validation": validation, "test": test}
        return _finish(name, problem, splits, seed=split_seed, classes_from_train=False)

    factory.__doc__ = f"{name}: data alias {alias!r}, {problem}."
    return factory


TASKS: dict[str, Callable[[int], TaskData]] = {
    "movie-polarity": _alias_task("movie-polarity", "movie", "classification"),
    "movie-score": _alias_task("movie-score", "movie-score", "regression"),
    "tweet-polarity": _alias_task("tweet-polarity", "tweets", "classification"),
    "chat-qa": _alias_task("chat-qa", "chat", "generation"),
}


# ------------------------------------------------------------------------------------- records
def _file_records(path: Path, kind: str) -> Records:
    """One split's rows of a ``csv:``, ``jsonl:`` or ``parquet:`` file (:mod:`.readers`); an empty
    file is an error."""
    records = {"csv": read_csv, "jsonl": read_json, "parquet": read_parquet}[kind](path)
    if records.empty:
        raise SensloraError(f"{path} is empty")
    return records


def _disk_splits(path: Path) -> dict[str, Records]:
    from datasets import DatasetDict

    ds = load_disk(path)
    if isinstance(ds, DatasetDict):
        return {name: dataset_records(split) for name, split in ds.items()}
    return {"all": dataset_records(ds)}


def _examples(
    records: Records,
    where: str,
    problem: str | None,
    text: str,
    pair: str | None,
    label: str,
    fmt: str = "text",
    allow_label_text: bool = False,
) -> list[Example]:
    """Rows -> examples with raw labels; generation rows become prompt (text) / answer (label) pairs,
    rows of a chat format (:mod:`.formats`) conversations or prompt-completion pairs.

    Checked once here: the text columns are not the label column, hold strings (or numbers) and
    are not copies of the labels (:func:`~senslora.data.examples.check_label_leak`)."""
    if fmt in CHAT_FORMATS:
        detect_format(records.columns, fmt, where=where)  # its columns are there
        examples = chat_examples(records.rows, records.places, fmt, where)
        for ex in examples:
            if ex.answer is None:  # a preference row of TRL's implicit-prompt text form
                raise SensloraError(
                    f"{where} {records.places[int(ex.id)]}: a preference row with a text 'chosen' and no 'prompt' "
                    "has no answer to generate; add a 'prompt' column, or use the file as calibration data (--calib)"
                )
        return drop_empty_texts(examples, where)
    check_text_columns(text, pair, label, where)
    needed = [(text, "text"), (label, "label")] + ([(pair, "text-pair")] if pair else [])
    for column, role in needed:
        if column not in records.columns:
            shown = name_items([repr(c) for c in records.columns]) or "none"
            raise SensloraError(f"{where} has no {role} column {column!r}; columns present: {shown}")
    for column in [text] + ([pair] if pair else []):
        check_text_cells([(i + 1, row.get(column)) for i, row in enumerate(records.rows)], where, column)
    cells = [(i + 1, row.get(label)) for i, row in enumerate(records.rows)]
    if problem == "generation":  # answers are text: only an absent one is missing
        check_label_cells(
            [(r, None if v is None or not str(v).strip() else v) for r, v in cells], where, label
        )
    else:
        check_label_cells(cells, where, label)
    examples = []
    for i, row in enumerate(records.rows):
        value = row.get(label)
        first = "" if row.get(text) is None else str(row[text])
        if problem == "generation":
            answer = str(value)
            examples.append(Example(text=f"{first}\n{answer}", prompt=first, answer=answer, id=str(i)))
        else:
            second = None if pair is None or row.get(pair) is None else str(row[pair])
            examples.append(Example(text=first, text_pair=second, label=value, id=str(i)))
    leak = [(i + 1, row.get(text), row.get(label)) for i, row in enumerate(records.rows)]
    check_label_leak(leak, where, text, allow=allow_label_text)
    return drop_empty_texts(examples, where)


def _unlabelled(records: Records, label: str, fmt: str = "text") -> bool:
    """True when no row of a split carries a real label (GLUE test splits use -1); rows of a chat
    format carry their answers."""
    if fmt in CHAT_FORMATS:
        return False
    return label not in records.columns or all(row.get(label) in (None, -1, "-1", "") for row in records.rows)


def _inferred(problem: str | None, examples: list[Example], where: str, loose: bool) -> tuple[str, bool]:
    """(problem, whether it was inferred): ``problem`` as given, else read from the labels."""
    if problem is not None:
        return problem, False
    return _infer_problem([(int(ex.id) + 1, ex.label) for ex in examples], where, loose), True


def _task_format(columns: Sequence[str], data_format: str, problem: str | None, text: str, where: str) -> str:
    """The rows' format (:func:`.formats.detect_format`). With a classification or regression
    ``problem``, ``auto`` is the text format; the chat formats are generation data."""
    if data_format == "auto" and problem in ("classification", "regression"):
        return "text"
    fmt = detect_format(columns, data_format, text_column=text, where=where)
    if fmt in CHAT_FORMATS and problem not in (None, "generation"):
        raise SensloraError(f"{where} is in the {fmt} format, which is generation data; drop --problem {problem}")
    return fmt


def _generic_task(
    spec: str,
    splits: dict[str, Records],
    *,
    text: str,
    pair: str | None,
    label: str,
    problem: str | None,
    split_seed: int,
    loose: bool = False,
    data_format: str = "auto",
    allow_label_text: bool = False,
) -> TaskData:
    first = splits.get("all") or splits.get("train") or next(iter(splits.values()))
    fmt = _task_format(first.columns, data_format, problem, text, spec)
    if fmt in CHAT_FORMATS:
        problem = "generation"
    if "all" in splits:
        examples = _examples(splits["all"], spec, problem, text, pair, label, fmt, allow_label_text)
        problem, inferred = _inferred(problem, examples, spec, loose)
        train, validation, test = split_80_10_10(examples, split_seed, spec)
        parts = {"train": train, "validation": validation, "test": test}
        task = _finish(spec, problem, parts, seed=split_seed, classes_from_train=False, loose=loose)
        task.inferred, task.data_format = inferred, fmt
        return task

    if "train" not in splits:
        raise SensloraError(f"{spec} has no 'train' split; splits present: {', '.join(splits)}")
    val_name = next((n for n in _VALIDATION_NAMES if n in splits), None)
    read = {}
    for name, recs in splits.items():
        if name in ("train", "test", val_name) and not (name == "test" and _unlabelled(recs, label, fmt)):
            read[name] = _examples(recs, f"{spec} ({name})", problem, text, pair, label, fmt, allow_label_text)
    problem, inferred = _inferred(problem, read["train"], f"{spec} (train)", loose)
    train = read["train"]
    if "test" in read:
        test = read["test"]
        if val_name is not None:
            validation = read[val_name]
        else:
            train, validation = _carve_validation(train, split_seed, spec)
    elif val_name is not None:
        test = read[val_name]
        train, validation = _carve_validation(train, split_seed, spec)
    else:
        raise SensloraError(
            f"{spec} has a train split but no labelled validation or test split; save one, or pass a single split"
        )
    for prefix, examples in (("train", train), ("validation", validation), ("test", test)):
        for ex in examples:
            ex.id = f"{prefix}:{ex.id}"
    splits_ = {"train": train, "validation": validation, "test": test}
    task = _finish(spec, problem, splits_, seed=split_seed, classes_from_train=True, loose=loose)
    task.inferred, task.data_format = inferred, fmt
    return task


# ------------------------------------------------------------------------------------- GLUE
# name -> (text column, text-pair column, problem, primary metric, validation split)
GLUE: dict[str, tuple[str, str | None, str, str, str]] = {
    "cola": ("sentence", None, "classification", "matthews", "validation"),
    "sst2": ("sentence", None, "classification", "accuracy", "validation"),
    "mrpc": ("sentence1", "sentence2", "classification", "f1", "validation"),
    "qqp": ("question1", "question2", "classification", "f1", "validation"),
    "stsb": ("sentence1", "sentence2", "regression", "pearson", "validation"),
    "mnli": ("premise", "hypothesis", "classification", "accuracy", "validation_matched"),
    "qnli": ("question", "sentence", "classification", "accuracy", "validation"),
    "rte": ("sentence1", "sentence2", "classification", "accuracy", "validation"),
    "wnli": ("sentence1", "sentence2", "classification", "accuracy", "validation"),
}


def _glue_task(name: str, split_seed: int) -> TaskData:
    if name not in GLUE:
        raise SensloraError(f"unknown GLUE task {name!r}; choose one of {', '.join(GLUE)}")
    text, pair, problem, primary, validation = GLUE[name]
    ds = load_hub("glue", name, None, what=f"GLUE {name} through datasets", instead="disk:FOLDER")
    splits = {"train": dataset_records(ds["train"]), "validation": dataset_records(ds[validation])}
    # GLUE hides its test labels: test = the official validation split, validation carved from train.
    task = _generic_task(
        f"glue:{name}", splits, text=text, pair=pair, label="label", problem=problem, split_seed=split_seed
    )
    task.primary_metric = primary
    return task


# ------------------------------------------------------------------------------------- entry
def _truncate(examples: list[Example], n: int | None, what: str) -> list[Example]:
    if n is None:
        return examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SensloraError(f"{what} must be a positive integer, got {n!r}")
    return examples[:n]


def load_task(
    spec: str,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    problem: str | None = None,
    split_seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    loose_labels: bool = False,
    data_format: str = "auto",
    allow_label_text: bool = False,
) -> TaskData:
    """Load a task by name (:data:`TASKS`) or generic spec (``csv:``, ``jsonl:``, ``parquet:``,
    ``disk:``, ``glue:``).

    Args:
        spec: task name or ``PREFIX:PATH``.
        text_column, text_pair_column, label_column: columns of a generic task (for ``generation``
            the text column is the prompt and the label column the answer).
        problem: ``classification`` | ``regression`` | ``generation``; generic tasks infer
            classification / regression when ``None``; a built-in task only accepts its own.
        split_seed: seed of the 80/10/10 split (and of carving a validation split).
        max_train_samples, max_eval_samples: keep the first n examples of the (shuffled) train
            split, and of each of validation and test.
        loose_labels: read a label column that mixes numbers and text as class names, and merge
            class names that differ only in case or spaces (by default both are errors).
        data_format: the rows' format (:mod:`.formats`): ``text`` (text and label columns),
            ``messages``, ``prompt-completion``, ``preference``, ``sharegpt`` or ``alpaca``
            (generation data, no label column; a preference row's chosen response is its
            answer), or ``auto``
            to detect it from the columns (the text format for a classification or regression
            ``problem``). Built-in tasks have their own.
        allow_label_text: only warn when the texts equal their labels in most rows (by default an
            error: the text column is a copy of the labels, the model would read the answer).

    Labels are checked once, here: a missing value (empty, NaN, None, null) or a list is an error
    naming the rows; empty texts are dropped with a warning; a class without a train example is
    an error. So are texts: a text column that is the label column, texts that are lists or
    objects, and texts equal to their label in most rows (``allow_label_text``: a warning). :meth:`TaskData.describe` says what the labels were read as.
    """
    if problem is not None and problem not in PROBLEMS:
        raise SensloraError(f"unknown problem {problem!r}; choose one of {', '.join(PROBLEMS)}")
    if data_format not in DATA_FORMATS:
        raise SensloraError(f"unknown data format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
    if spec in TASKS:
        if data_format != "auto":
            raise SensloraError(f"task {spec} has its own data format; drop --data-format {data_format}")
        task = TASKS[spec](split_seed)
        if problem is not None and problem != task.problem:
            raise SensloraError(f"task {spec} is a {task.problem} task; drop --problem {problem}")
    elif spec.startswith("glue:"):
        task = _glue_task(spec[len("glue:") :], split_seed)
    elif spec.startswith(DATA_PREFIXES):
        kind, _, raw = spec.partition(":")
        path = Path(raw).expanduser()
        if kind == "disk":
            if not path.is_dir():
                raise SensloraError(
                    f"{path} is not a folder; disk: takes a folder written by datasets' save_to_disk"
                )
            splits = _disk_splits(path)
        else:
            check_input_file(path, "data file", f"for a folder saved by datasets write disk:{path}")
            splits = {"all": _file_records(path, kind)}
        task = _generic_task(
            spec,
            splits,
            text=text_column,
            pair=text_pair_column,
            label=label_column,
            problem=problem,
            split_seed=split_seed,
            loose=loose_labels,
            data_format=data_format,
            allow_label_text=allow_label_text,
        )
    else:
        hint = f"; for a data file write csv:{spec}, jsonl:{spec} or parquet:{spec}" if Path(spec).exists() else ""
        raise SensloraError(
            f"unknown task {spec!r}; choose one of {', '.join(TASKS)} or csv:PATH, jsonl:PATH, parquet:PATH, "
            f"disk:PATH, glue:NAME{hint}"
        )
    task.train = _truncate(task.train, max_train_samples, "max_train_samples")
    task.validation = _truncate(task.validation, max_eval_samples, "max_eval_samples")
    task.test = _truncate(task.test, max_eval_samples, "max_eval_samples")
    return task
