"""The one reader of data files and folders, behind calibration sets (:mod:`.examples`) and tasks
(:mod:`.tasks`): rows as dicts, with the column names present and where each row is.

* ``.csv`` / ``.tsv`` (:func:`read_csv`): a header row, then data rows; rows whose cells are all
  blank are skipped; every value is the cell's text.
* ``.jsonl`` / ``.json`` (:func:`read_json`): JSON lines, or one JSON array of objects; values keep
  their JSON types.
* ``.parquet`` (:func:`read_parquet`): values keep their Arrow types (lists, structs as dicts).
* a folder written by ``datasets``' ``save_to_disk`` (:func:`load_disk`) and a hub data set
  (:func:`load_hub`), turned into rows by :func:`dataset_records`.

Files are parsed here with the standard library, not with ``datasets``' csv / json builders: those
infer column types (``007`` becomes ``7``, an empty cell ``NaN``, a column mixing numbers and text
is coerced or refused by Arrow), which would change the examples and hide the per-row label errors
of :mod:`.tasks`; they also write an Arrow copy of every file into the ``datasets`` cache.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import SensloraError, first_line


@dataclass
class Records:
    """Rows of one table or split as dicts, the column names present (in first-seen order) and,
    per row, where it is for messages (``row 3``, ``line 5``, ``item 2``)."""

    columns: list[str]
    rows: list[dict[str, Any]]
    places: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing at all: no column and no row (an empty or blank file)."""
        return not self.columns and not self.rows


def read_text_file(path: Path) -> str:
    """The file's text (UTF-8, a leading BOM dropped), or a one-line :class:`SensloraError`."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SensloraError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise SensloraError(f"cannot read {path} ({exc.strerror or exc})") from exc


def read_csv(path: Path) -> Records:
    """A CSV file (tab-separated when its suffix is ``.tsv``) with a header row.

    Rows numbered from 1 after the header (blank rows skipped); duplicate column names and rows
    whose number of fields differs from the header's are errors."""
    kind = "TSV" if path.suffix.lower() == ".tsv" else "CSV"
    reader = csv.reader(
        io.StringIO(read_text_file(path), newline=""), delimiter="\t" if kind == "TSV" else ",", strict=True
    )
    try:
        table = [row for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise SensloraError(f"{path} does not parse as {kind} (line {reader.line_num}: {exc})") from exc
    if not table:
        return Records([], [], [])
    header = [h.strip() for h in table[0]]
    if len(set(header)) != len(header):
        raise SensloraError(f"{path} has duplicate column names in its header: {', '.join(header)}")
    rows = []
    for i, row in enumerate(table[1:], start=1):
        if len(row) != len(header):
            raise SensloraError(
                f"{path} does not parse as {kind}: data row {i} has {len(row)} fields, the header {len(header)}"
            )
        rows.append(dict(zip(header, row, strict=True)))
    return Records(header, rows, [f"row {i}" for i in range(1, len(rows) + 1)])


def read_json(path: Path) -> Records:
    """JSON lines (blank lines skipped), or one JSON array when the text starts with ``[``; every
    record must be an object. Places are line numbers (JSON lines) or item numbers (array)."""
    text = read_text_file(path)
    numbered: list[tuple[int, Any]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SensloraError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        numbered = list(enumerate(data, start=1))
        unit = "item"
    else:
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise SensloraError(
                    f"{path} line {lineno} is not valid JSON ({exc.msg}); expected one object per line"
                ) from exc
        unit = "line"
    columns: dict[str, None] = {}
    for number, obj in numbered:
        if not isinstance(obj, dict):
            raise SensloraError(f"{path} {unit} {number} is a {type(obj).__name__}, expected a JSON object")
        columns.update(dict.fromkeys(obj))
    return Records(list(columns), [obj for _, obj in numbered], [f"{unit} {n}" for n, _ in numbered])


def read_parquet(path: Path) -> Records:
    """A Parquet file (read with pyarrow, which ``datasets`` installs); values keep their types
    (lists of turns stay lists of dicts). Places are row numbers from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise SensloraError(f"{path} does not read as Parquet ({first_line(exc)})") from exc
    rows = table.to_pylist()
    return Records(list(table.column_names), rows, [f"row {i}" for i in range(1, len(rows) + 1)])


def dataset_records(ds: Any, only: list[str] | None = None) -> Records:
    """Rows of a ``datasets.Dataset`` (all its columns, or those of ``only``), places ``row 0``, ...;
    ``columns`` always names every column of the data set."""
    columns = list(ds.column_names)
    read = columns if only is None else [c for c in only if c in columns]
    data = {c: ds[c] for c in read}
    rows = [{c: data[c][i] for c in read} for i in range(len(ds))]
    return Records(columns, rows, [f"row {i}" for i in range(len(rows))])


def load_disk(path: Path) -> Any:
    """The ``Dataset`` or ``DatasetDict`` a ``save_to_disk`` folder holds."""
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise SensloraError(
            f"{path} is a folder but not a data set saved with datasets' save_to_disk ({first_line(exc)})"
        ) from exc


def load_hub(name: str, config: str | None, split: str | None, *, what: str, instead: str) -> Any:
    """``datasets.load_dataset(name, config, split=split)``; any failure (network, a missing data
    set, a bad config or split) is a :class:`SensloraError` naming ``what`` and suggesting a
    ``save_to_disk`` folder passed as ``instead``."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing data set, bad config or split: all user-fixable
        raise SensloraError(
            f"cannot load {what} ({type(exc).__name__}: {first_line(exc)}); this needs network access, "
            f"or save it with save_to_disk where there is network and pass {instead}"
        ) from exc
