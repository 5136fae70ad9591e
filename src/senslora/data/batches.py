"""Tokenised, padded batches of examples (:func:`make_batches`), and the padding every batch
builder shares (:func:`pad_rows`, :func:`padding_id`).

Batches are dicts of tensors: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), and
``labels`` (one per example, or per token for causal LMs, with
:data:`senslora.core.losses.IGNORE_INDEX` where no loss is taken). Importing this module does not
import torch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.errors import SensloraError
from .schema import Example

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BATCH_KINDS = ("classification", "regression", "causal-lm", "base")


# --------------------------------------------------------------------------------------- padding
def padding_id(tokenizer: Any) -> int:
    """The token id padding uses: the tokenizer's pad token, else its EOS, else 0.

    :func:`senslora.data.models.load_model` gives every tokenizer a pad token; the fallbacks are
    for tokenizers built elsewhere."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def pad_rows(
    rows: Sequence[Sequence[int]], value: int, *, left: bool = False, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` as one ``(len(rows), width)`` LongTensor filled up with ``value``, and the 0/1
    LongTensor mask of the real entries (an attention mask).

    Rows are padded on the right (``left``: on the left, as generation needs); ``width`` defaults
    to the longest row's length and must not be smaller."""
    import torch

    if width is None:
        width = max((len(r) for r in rows), default=0)
    values = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not len(row):
            continue
        span = slice(width - len(row), width) if left else slice(0, len(row))
        values[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return values, mask


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


def _render(tokenizer: Any, turns: Sequence[dict[str, str]], ex: Example, *, generation: bool = False) -> str:
    """``turns`` through the tokenizer's chat template (text, not tokens); a tokenizer without a
    template, or a template that fails on them, is a one-line error naming the example."""
    if not _has_chat_template(tokenizer):
        raise SensloraError(
            f"example {ex.id or '?'} is a conversation, and the tokenizer has no chat template to render it; "
            "use a chat model's tokenizer, or data in the text or prompt-completion (text) format"
        )
    try:
        return tokenizer.apply_chat_template(
            list(turns), tools=ex.tools, tokenize=False, add_generation_prompt=generation
        )
    except Exception as exc:  # jinja errors (raise_exception in templates, undefined keys): user data
        raise SensloraError(
            f"the tokenizer's chat template fails on example {ex.id or '?'} ({type(exc).__name__}: {exc})"
        ) from exc


def _turn_spans(
    tokenizer: Any, ex: Example, answers: Sequence[int], full: str
) -> list[tuple[int, int]] | None:
    """Where each assistant turn of ``answers`` lies in ``full``, the whole conversation rendered:
    the text its rendering adds after the rendering of the turns before it with the generation
    prompt (the assistant header). None when a rendering is not a prefix of ``full``."""
    turns = ex.messages or []
    spans: list[tuple[int, int]] = []
    done = 0
    for i in answers:
        before = _render(tokenizer, turns[:i], ex, generation=True) if i else ""
        upto = _render(tokenizer, turns[: i + 1], ex)
        start = len(before)
        if not (full.startswith(before) and full.startswith(upto) and done <= start <= len(upto)):
            return None
        spans.append((start, len(upto)))
        done = len(upto)
    return spans


def _chat_segments(ex: Example, tokenizer: Any) -> list[tuple[str, bool]]:
    """The rendered conversation of ``ex`` as consecutive ``(text, loss)`` pieces: the loss is on
    each assistant turn from ``ex.loss_from`` on (:func:`_turn_spans`).

    Some templates render an assistant turn differently once a later turn follows (Qwen3's drops
    the reasoning block of every turn before the last user query): the turns cannot all be told
    apart, and the loss is on the last assistant turn only, with a warning once per tokenizer.
    A template that does not even render the last turn after its prefix is a one-line error."""
    turns = ex.messages or []
    full = _render(tokenizer, turns, ex)
    answers = [i for i, turn in enumerate(turns) if turn["role"] == "assistant" and i >= ex.loss_from]
    spans = _turn_spans(tokenizer, ex, answers, full)
    if spans is None and len(answers) > 1:
        spans = _turn_spans(tokenizer, ex, answers[-1:], full)
        if spans is not None:
            _warn_once(
                tokenizer,
                "last-turn",
                "the chat template renders earlier assistant turns differently once later turns follow (as "
                "Qwen3's drops their reasoning): the loss is on the last assistant turn of each such conversation",
            )
    if spans is None:
        raise SensloraError(
            f"the tokenizer's chat template does not render example {ex.id or '?'} turn by turn (the text "
            "of its first turns is not a prefix of the whole conversation's), so the assistant turns cannot "
            "be told apart; use the prompt-completion format or another chat template"
        )
    pieces: list[tuple[str, bool]] = []
    done = 0
    for start, end in spans:
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    pieces.append((full[done:], False))
    return [(text, loss) for text, loss in pieces if text]


def _chat_ids(ex: Example, tokenizer: Any, max_length: int) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of a conversation (:func:`_chat_segments`). A conversation that
    ends with an assistant turn ends with EOS (as a prompt/answer pair does). Too long: the first
    ``max_length`` tokens, or, when those hold no assistant token, the window of ``max_length``
    tokens that starts ``max_length // 2`` tokens before the first one (or ends with the last)."""
    pieces = _chat_segments(ex, tokenizer)
    if pieces and pieces[-1][1]:
        pieces[-1] = (pieces[-1][0].rstrip(), True)
    ids: list[int] = []
    mask: list[bool] = []
    for text, loss in pieces:
        piece = _encode(tokenizer, text)
        ids += piece
        mask += [loss] * len(piece)
    eos = tokenizer.eos_token_id
    if pieces and pieces[-1][1] and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        mask.append(True)
    start = 0
    if len(ids) > max_length and not any(mask[:max_length]) and any(mask):
        start = max(0, min(mask.index(True) - max_length // 2, len(ids) - max_length))
    return ids[start : start + max_length], mask[start : start + max_length]


def _pair_ids(ex: Example, tokenizer: Any, prefix: list[int]) -> tuple[list[int], list[int]]:
    """Prompt and answer token ids of a prompt/answer example (before truncation)."""
    eos = tokenizer.eos_token_id
    if ex.plain:  # TRL's standard prompt-completion: the texts as they are
        p_ids = prefix + _encode(tokenizer, ex.prompt)
        a_text = ex.answer
    elif _has_chat_template(tokenizer):
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
    return p_ids, a_ids


def _causal_ids(ex: Example, tokenizer: Any, max_length: int, prefix: list[int]) -> tuple[list[int], list[bool]]:
    """Token ids of a causal-LM example and, per token, whether the loss is taken on it."""
    if ex.messages is not None:
        return _chat_ids(ex, tokenizer, max_length)
    if ex.prompt is None or ex.answer is None:
        ids = prefix + _encode(tokenizer, ex.text)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids[:max_length], [True] * min(len(ids), max_length)
    p_ids, a_ids = _pair_ids(ex, tokenizer, prefix)
    if len(p_ids) + len(a_ids) > max_length:
        # The answer keeps everything the prompt leaves, but at least min(len, max_length // 2)
        # tokens; the prompt is cut from the left so that its end (the generation cue) survives.
        a_keep = max(max_length - len(p_ids), min(len(a_ids), max_length // 2))
        a_ids = a_ids[:a_keep]
        p_ids = p_ids[len(p_ids) - (max_length - len(a_ids)) :] if max_length > len(a_ids) else []
    return p_ids + a_ids, [False] * len(p_ids) + [True] * len(a_ids)


def prompt_ids(ex: Example, tokenizer: Any) -> list[int]:
    """The token ids a causal LM sees before the answer of ``ex`` (its last assistant turn for a
    conversation), built exactly as :func:`make_batches` builds them: what generation starts from."""
    if ex.messages is not None:
        last = max(i for i, turn in enumerate(ex.messages) if turn["role"] == "assistant")
        return _encode(tokenizer, _render(tokenizer, ex.messages[:last], ex, generation=True))
    prefix = [] if _has_chat_template(tokenizer) and not ex.plain else bos_prefix(tokenizer)
    text = ex.prompt if ex.plain else prompt_text(tokenizer, ex.prompt if ex.prompt is not None else ex.text)
    return prefix + _encode(tokenizer, text)


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
    _warn_once(
        tokenizer,
        (limit, max_length),
        f"--max-length {max_length} exceeds the model's {limit} positions; texts are truncated to {limit} tokens",
    )
    return limit


def _warn_once(tokenizer: Any, key: object, message: str) -> None:
    """``message`` as a warning the first time ``key`` is seen with this tokenizer."""
    warned = getattr(tokenizer, "_senslora_warned", set())
    if key not in warned:
        logger.warning("%s", message)
        with contextlib.suppress(AttributeError, TypeError):
            tokenizer._senslora_warned = warned | {key}


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
    them, every kind but ``causal-lm``), padded on the right with :func:`padding_id` to the longest
    sequence of the batch, truncated at ``max_length`` tokens (or the tokenizer's smaller
    ``model_max_length``, with a warning), and ``labels``:

    * ``classification``: ``LongTensor (B,)``; ``regression``: ``FloatTensor (B,)``. If no example
      has a label there is no ``labels`` key; a mix of labelled and unlabelled is an error.
    * ``causal-lm``: the input ids with -100 (:data:`senslora.core.losses.IGNORE_INDEX`) on padding and, for
      prompt/answer examples, on the prompt tokens (loss on the answer only). Text is
      ``prompt_text(tokenizer, prompt)`` + answer (chat template when the tokenizer has one) and
      ends with EOS, unless truncation cut it off (a plain text longer than ``max_length``).
      Conversations (``messages``) go through the chat template with the loss on their assistant
      turns only; TRL's standard prompt-completion pairs (``plain``) are prompt + completion as
      they are, loss on the completion.
    * ``base``: no labels.
    """
    import torch

    from ..core.losses import IGNORE_INDEX  # imports torch: not at module level

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

    pad_id = padding_id(tokenizer)
    prefix = bos_prefix(tokenizer) if kind == "causal-lm" else []

    batches: list[dict[str, Any]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        seqs: list[list[int]] = []
        types: list[list[int]] | None = []
        losses: list[list[bool]] = []
        for ex in chunk:
            if kind == "causal-lm":
                ids, loss = _causal_ids(ex, tokenizer, max_length, prefix)
                seqs.append(ids)
                losses.append(loss)
                types = None
            else:
                enc = tokenizer(ex.text, ex.text_pair, truncation=True, max_length=max_length)
                seqs.append(list(enc["input_ids"]))
                tt = enc.get("token_type_ids")
                if types is not None and tt is not None:
                    types.append(list(tt))
                else:
                    types = None
        input_ids, attention = pad_rows(seqs, pad_id)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
        if types:
            batch["token_type_ids"] = pad_rows(types, 0, width=input_ids.shape[1])[0]
        if kind == "causal-lm":
            taken = pad_rows([[int(x) for x in loss] for loss in losses], 0, width=input_ids.shape[1])[0]
            batch["labels"] = input_ids.masked_fill(taken == 0, IGNORE_INDEX)
        elif with_labels and kind == "classification":
            batch["labels"] = torch.tensor([_class_label(ex.label, ex) for ex in chunk], dtype=torch.long)
        elif with_labels:
            batch["labels"] = torch.tensor([float(ex.label) for ex in chunk], dtype=torch.float32)
        batches.append(batch)
    return batches


LOSS_OPEN, LOSS_CLOSE = "\u27e6", "\u27e7"  # the marks around the tokens a causal LM's loss is on


def marked_text(tokenizer: Any, batch: dict[str, Any], row: int) -> str:
    """Row ``row`` of a batch of :func:`make_batches` as text, its padding left out and, for a causal
    LM's batch, every run of tokens the loss is taken on between :data:`LOSS_OPEN` and
    :data:`LOSS_CLOSE`: what training and the gradient estimators see of that example."""
    from ..core.losses import IGNORE_INDEX

    real = batch["attention_mask"][row].bool()
    ids = batch["input_ids"][row][real].tolist()
    if "labels" not in batch or batch["labels"].dim() != 2:
        return tokenizer.decode(ids, skip_special_tokens=False)
    loss = (batch["labels"][row][real] != IGNORE_INDEX).tolist()
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or loss[end] != loss[start]:
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            pieces.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if loss[start] else text)
            start = end
    return "".join(pieces)
