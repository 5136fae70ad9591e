"""The one example record (:class:`Example`) that the formats, the batches and the example loaders
share. It lives below them all (:mod:`.examples` re-exports it), so that none of them imports
another to name it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Example:
    """One example. For generation data ``prompt``/``answer`` are set and ``text`` is
    ``prompt + "\\n" + answer``; :func:`~senslora.data.batches.make_batches` then puts the loss on the answer only.

    Chat formats (:mod:`.formats`): a conversation has ``messages`` (``{"role", "content"}``
    turns; the loss is on the assistant turns from index ``loss_from`` on), with ``answer`` its
    last assistant turn and ``prompt`` the turns before it (as text, for checks and data
    selection). ``plain``: ``prompt`` and ``answer`` are TRL's standard prompt-completion pair,
    tokenised as they are, one after the other (no chat template, no newline)."""

    text: str
    text_pair: str | None = None
    label: float | int | None = None
    prompt: str | None = None
    answer: str | None = None
    id: str = ""
    messages: list[dict[str, Any]] | None = None
    loss_from: int = 0
    plain: bool = False
    tools: list[dict[str, Any]] | None = None  # function schemas of a tool-calling conversation
