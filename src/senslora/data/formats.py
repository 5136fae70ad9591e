"""TRL's data set formats, and the alpaca and ShareGPT formats of LLaMA-Factory and axolotl, for
calibration sets and tasks alike: which format rows are in (:func:`detect_format`), and the rows of
a chat format as :class:`~senslora.data.schema.Example` records (:func:`chat_examples`).

* ``text``: a text column (``text``, or ``--text-column``), with a label column for tasks; for a
  causal LM the whole text carries the loss.
* ``messages``: a ``messages`` column holding a conversation, a list of ``{"role", "content"}``
  turns (roles ``system``, ``user``, ``assistant``, ``tool``). The tokenizer's chat template
  renders every turn; the loss is on the assistant turns only. Each row needs an assistant turn.
  Tool calling as TRL has it: an assistant turn may carry ``tool_calls`` (its content then may be
  empty or null), a tool turn ``name`` / ``tool_call_id``, and a ``tools`` column the function
  schemas; all of them go to the chat template (``apply_chat_template(..., tools=...)``), and the
  loss covers the calls the assistant turns make. So does an assistant turn's reasoning
  (``reasoning_content``, ``thinking``) for the templates that render it.
* ``prompt-completion``: ``prompt`` and ``completion`` columns, both text (TRL's standard form:
  the completion follows the prompt as is, no template, loss on the completion) or both lists of
  turns (the conversational form: the chat template renders prompt + completion, and the loss is
  on the completion's assistant turns). With a boolean ``label`` column they are TRL's unpaired
  preference data (KTO's): only the desirable completions (``label`` true) are read, and a warning
  says how many were left out.
* ``preference``: ``chosen`` and ``rejected`` columns, with an optional ``prompt`` (TRL's DPO data,
  explicit or implicit prompt, text or turns). The chosen response is the completion, exactly as
  prompt-completion reads it; without a prompt, a chosen conversation carries the loss on its
  assistant turns and a chosen text on all of it. ``rejected`` is not read: calibration and
  fine-tuning measure the loss of the response the data prefers.
* ``sharegpt``: a ``conversations`` column of ``{"from", "value"}`` turns (``human``, ``gpt``,
  ``system``, ``function_call``, ``observation``; the OpenAI names ``user``, ``assistant``, ``tool``
  too) and an optional ``system`` column: read as ``messages``, the system text first.
* ``alpaca``: ``instruction`` and ``output`` columns, with optional ``input`` (joined to the
  instruction with a newline, as LLaMA-Factory does), ``system`` and ``history`` (earlier
  ``[instruction, response]`` pairs): read as ``messages``, so the loss is on every response.

Detection (``auto``) looks at the columns in :data:`DETECTION` order. A CSV cell of a turns
column (``messages``, ``conversations``, ``history``) is read as JSON text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from ..core.errors import SensloraError
from .schema import Example

DATA_FORMATS = ("auto", "text", "messages", "prompt-completion", "preference", "sharegpt", "alpaca")
CHAT_FORMATS = ("messages", "prompt-completion", "preference", "sharegpt", "alpaca")
DETECTION = ("messages", "prompt-completion", "preference", "sharegpt", "alpaca", "text")
ROLES = ("system", "user", "assistant", "tool")
MESSAGES, PROMPT, COMPLETION = "messages", "prompt", "completion"
CHOSEN, REJECTED = "chosen", "rejected"
LABEL = "label"  # with prompt-completion: TRL's unpaired preference, a boolean per completion
TOOLS = "tools"  # the function schemas of tool-calling conversations (TRL's ``tools`` column)
# Turn keys kept for the chat template besides role and content: tool calling (TRL's form), and the
# reasoning of an assistant turn as Qwen3's (``reasoning_content``) and gpt-oss's (``thinking``) read it.
TEMPLATE_KEYS = ("tool_calls", "name", "tool_call_id", "reasoning_content", "thinking")
CONVERSATIONS, SYSTEM = "conversations", "system"
INSTRUCTION, INPUT, OUTPUT, HISTORY = "instruction", "input", "output", "history"
# ShareGPT's speakers (LLaMA-Factory's default tags, and the OpenAI names) -> roles
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool",
}  # fmt: skip
_BOOLEANS = {"true": True, "false": False}
# chat format -> (the columns that make it, the columns its rows are read from; absent optional ones are skipped)
_COLUMNS = {
    "messages": ([MESSAGES], [MESSAGES, TOOLS]),
    "prompt-completion": ([PROMPT, COMPLETION], [PROMPT, COMPLETION, LABEL, TOOLS]),
    "preference": ([CHOSEN, REJECTED], [PROMPT, CHOSEN, TOOLS]),
    "sharegpt": ([CONVERSATIONS], [CONVERSATIONS, SYSTEM]),
    "alpaca": ([INSTRUCTION, OUTPUT], [INSTRUCTION, INPUT, OUTPUT, SYSTEM, HISTORY]),
}

logger = logging.getLogger(__name__)


def _needed(fmt: str, text_column: str) -> list[str]:
    """The columns that make rows format ``fmt``."""
    return _COLUMNS[fmt][0] if fmt in _COLUMNS else [text_column]


def read_columns(fmt: str) -> list[str]:
    """The columns a chat format's rows are read from."""
    return _COLUMNS[fmt][1]


def _looked_for(fmt: str, text_column: str) -> str:
    columns = _needed(fmt, text_column)
    named = f"a {columns[0]!r} column" if len(columns) == 1 else " and ".join(map(repr, columns)) + " columns"
    return f"{named} ({fmt}{', --text-column' if fmt == 'text' else ''})"


def detect_format(columns: Sequence[str], requested: str = "auto", *, text_column: str = "text", where: str) -> str:
    """The format of rows with ``columns``: ``requested`` (its columns checked), or for ``auto``
    the first of messages, prompt-completion, text whose columns are all present.

    A format that cannot be detected, or a requested one whose columns are missing, is a
    :class:`SensloraError` naming the formats looked for and the columns found."""
    if requested not in DATA_FORMATS:
        raise SensloraError(f"unknown data format {requested!r}; choose one of {', '.join(DATA_FORMATS)}")
    found = ", ".join(repr(c) for c in columns) or "none"
    if requested != "auto":
        missing = [c for c in _needed(requested, text_column) if c not in columns]
        if missing:
            names = " and ".join(repr(c) for c in missing)
            raise SensloraError(f"{where} is not in the {requested} format: no {names} column; columns present: {found}")
        return requested
    for fmt in DETECTION:
        if all(c in columns for c in _needed(fmt, text_column)):
            return fmt
    looked = [_looked_for(fmt, text_column) for fmt in DETECTION]
    raise SensloraError(
        f"cannot tell the data format of {where}: looked for {', '.join(looked[:-1])} and {looked[-1]}; "
        f"columns present: {found}"
    )


def _list_cell(value: Any, where: str, column: str, what: str) -> list:
    """A cell that must hold a non-empty list of ``what`` (JSON text, as in a CSV, is parsed)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SensloraError(f"{where}: column {column!r} must hold a list of {what}; its text is not JSON") from None
    if not isinstance(value, (list, tuple)) or not value:
        shown = "an empty list" if isinstance(value, (list, tuple)) else type(value).__name__
        raise SensloraError(f"{where}: column {column!r} must hold a list of {what}, found {shown}")
    return list(value)


def check_turns(value: Any, where: str, column: str) -> list[dict[str, str]]:
    """A conversation cell as a list of ``{"role", "content"}`` turns (JSON text is parsed); any
    other shape, an unknown role or a non-text content is a one-line error naming ``where``."""
    value = _list_cell(value, where, column, "{role, content} turns")
    turns = []
    for number, turn in enumerate(value, start=1):
        calls = turn.get("tool_calls") if isinstance(turn, dict) else None
        if not isinstance(turn, dict) or "role" not in turn or ("content" not in turn and not calls):
            raise SensloraError(f"{where}: turn {number} of {column!r} is not a {{role, content}} object: {turn!r}")
        if turn["role"] not in ROLES:
            raise SensloraError(
                f"{where}: turn {number} of {column!r} has the unknown role {turn['role']!r}; roles are {', '.join(ROLES)}"
            )
        if calls is not None and not (isinstance(calls, (list, tuple)) and turn["role"] == "assistant"):
            raise SensloraError(
                f"{where}: turn {number} of {column!r} has tool_calls that are not a list of calls of an assistant turn"
            )
        content = "" if turn.get("content") is None and calls else turn.get("content")
        if not isinstance(content, str):
            raise SensloraError(
                f"{where}: turn {number} of {column!r} has {type(content).__name__} content; it must be text"
            )
        # Template keys as given; None ones (a data set's struct columns) are dropped.
        extra = {key: turn[key] for key in TEMPLATE_KEYS if turn.get(key) is not None}
        turns.append({"role": turn["role"], "content": content, **extra})
    return turns


def _conversation(turns: list[dict[str, str]], loss_from: int, where: str, row_id: str, what: str) -> Example:
    answers = [i for i, turn in enumerate(turns) if turn["role"] == "assistant" and i >= loss_from]
    if not answers:
        raise SensloraError(
            f"{where}: {what} has no assistant turn; the loss is on assistant turns, so every row needs one"
        )
    last = answers[-1]
    prompt = "\n".join(turn["content"] for turn in turns[:last])
    return Example(
        text="\n".join(turn["content"] for turn in turns),
        prompt=prompt,
        answer=turns[last]["content"],
        messages=turns,
        loss_from=loss_from,
        id=row_id,
    )


def chat_examples(rows: Sequence[dict[str, Any]], places: Sequence[str], fmt: str, where: str) -> list[Example]:
    """Every row of a chat format as an example, with ids ``"0"``, ``"1"``, ... in row order
    (``places`` name the rows in errors: ``line 7``, ``row 3``). Rows of TRL's unpaired preference
    data whose completion is undesirable are left out (:func:`_desirable`), with a warning."""
    keep = _desirable(rows, places, where) if fmt == "prompt-completion" else [True] * len(rows)
    examples = [
        _with_tools(chat_example(row, fmt, f"{where} {place}", str(i)), row, f"{where} {place}")
        for i, (row, place, kept) in enumerate(zip(rows, places, keep, strict=True))
        if kept
    ]
    if len(examples) < len(rows):
        if not examples:
            raise SensloraError(
                f"{where}: every completion has label false (undesirable, TRL's unpaired preference format); "
                "nothing is left to read"
            )
        logger.warning(
            "%s: left out %d of %d completions with label false (undesirable, TRL's unpaired preference format)",
            where, len(rows) - len(examples), len(rows),
        )  # fmt: skip
    return examples


def _optional_list(row: dict[str, Any], column: str, where: str, what: str) -> list:
    """An optional column's list of ``what`` (:func:`_list_cell`); [] when the cell is absent or empty."""
    return [] if row.get(column) in (None, "", []) else _list_cell(row[column], where, column, what)


def _text_cell(row: dict[str, Any], column: str, where: str) -> str:
    """An optional text column's value ("" when absent); anything but text is a one-line error."""
    value = row.get(column)
    if value is not None and not isinstance(value, str):
        raise SensloraError(f"{where}: column {column!r} holds {type(value).__name__}; it must be text")
    return value or ""


def _with_tools(ex: Example, row: dict[str, Any], where: str) -> Example:
    """``ex`` with the row's ``tools`` (a list of function schemas, or its JSON text) for the template."""
    tools = _optional_list(row, TOOLS, where, "function schemas") if ex.messages is not None else []
    if not tools:
        return ex
    if not all(isinstance(tool, dict) for tool in tools):
        raise SensloraError(f"{where}: column 'tools' must hold function schemas (JSON objects)")
    ex.tools = tools
    return ex


def _desirable(rows: Sequence[dict[str, Any]], places: Sequence[str], where: str) -> list[bool]:
    """Per prompt-completion row, whether to read it: all rows, unless the ``label`` column holds
    booleans (JSON true / false, or the texts ``true`` / ``false`` of a CSV): then the rows labelled
    true. A column that mixes booleans with anything else is an error naming the first such row."""
    labels = [row.get(LABEL) for row in rows]

    def boolean(value: Any) -> bool | None:
        if isinstance(value, bool):
            return value
        return _BOOLEANS.get(value.strip().lower()) if isinstance(value, str) else None

    read = [boolean(value) for value in labels]
    if all(value is None for value in read):
        return [True] * len(rows)  # no label column, or one that is not TRL's boolean
    for value, got, place in zip(labels, read, places, strict=True):
        if got is None:
            raise SensloraError(
                f"{where} {place}: column 'label' holds true / false (TRL's unpaired preference format) but "
                f"here {value!r}; give every completion true or false"
            )
    return [bool(value) for value in read]


def chat_example(row: dict[str, Any], fmt: str, where: str, row_id: str) -> Example:
    """One row of a chat format (:data:`CHAT_FORMATS`) as an example; ``where`` names the row."""
    if fmt == "messages":
        turns = check_turns(row.get(MESSAGES), where, MESSAGES)
        return _conversation(turns, 0, where, row_id, "the conversation")
    if fmt in ("sharegpt", "alpaca"):
        turns = _sharegpt_turns(row, where) if fmt == "sharegpt" else _alpaca_turns(row, where)
        return _conversation(turns, 0, where, row_id, "the conversation")
    if fmt == "preference":
        prompt, chosen = row.get(PROMPT), row.get(CHOSEN)
        if prompt is None:  # TRL's implicit prompt: the chosen text, or conversation, alone
            if isinstance(chosen, str):
                return Example(text=chosen, id=row_id)
            return _conversation(check_turns(chosen, where, CHOSEN), 0, where, row_id, "the chosen conversation")
        return _prompt_and(prompt, chosen, CHOSEN, where, row_id)
    return _prompt_and(row.get(PROMPT), row.get(COMPLETION), COMPLETION, where, row_id)


def _prompt_and(prompt: Any, completion: Any, column: str, where: str, row_id: str) -> Example:
    """A prompt and its completion (``column``: ``completion``, or a preference row's ``chosen``):
    TRL's standard form (both text) or its conversational one (both lists of turns)."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return Example(text=prompt + completion, prompt=prompt, answer=completion, plain=True, id=row_id)
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        first = check_turns(prompt, where, PROMPT)
        turns = first + check_turns(completion, where, column)
        return _conversation(turns, len(first), where, row_id, f"the {column}")
    kinds = f"{type(prompt).__name__} and {type(completion).__name__}"
    raise SensloraError(
        f"{where}: 'prompt' and {column!r} must both be text or both be lists of turns, found {kinds}"
    )


def _system_turn(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The optional ``system`` column of a ShareGPT or alpaca row as a first turn ([] when empty)."""
    system = _text_cell(row, SYSTEM, where)
    return [{"role": "system", "content": system}] if system else []


def _sharegpt_turns(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A ShareGPT row's ``conversations`` (``{"from", "value"}`` turns) as role / content turns."""
    turns = _system_turn(row, where)
    for number, turn in enumerate(_list_cell(row.get(CONVERSATIONS), where, CONVERSATIONS, "{from, value} turns"), 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SensloraError(f"{where}: turn {number} of 'conversations' is not a {{from, value}} object: {turn!r}")
        if turn["from"] not in SHAREGPT_ROLES:
            raise SensloraError(
                f"{where}: turn {number} of 'conversations' is from the unknown speaker {turn['from']!r}; "
                f"speakers are {', '.join(SHAREGPT_ROLES)}"
            )
        turns.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return check_turns(turns, where, CONVERSATIONS)


def _alpaca_turns(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """An alpaca row as turns: system, the history's pairs, then instruction (+ newline + input) and output."""
    texts = {column: _text_cell(row, column, where) for column in (INSTRUCTION, INPUT, OUTPUT)}
    turns = _system_turn(row, where)
    for number, pair in enumerate(_optional_list(row, HISTORY, where, "[instruction, response] pairs"), 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise SensloraError(f"{where}: item {number} of 'history' is not an [instruction, response] pair of texts")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = "\n".join(t for t in (texts[INSTRUCTION], texts[INPUT]) if t)
    return turns + [{"role": "user", "content": query}, {"role": "assistant", "content": texts[OUTPUT]}]
