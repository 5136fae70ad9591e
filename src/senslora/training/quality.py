"""TsqLoRA-style data-quality selection (METHOD.md section 7; the TsqLoRA paper).

TsqLoRA (Chen et al., 2025, arXiv:2509.18585) pairs "a quality-aware sampling mechanism for selecting
the most informative training data" with sensitivity-aware rank allocation. No public code could
be found (the abstract announces github.com/Benjamin-Ricky/TsqLoRA); this module is OUR READING OF
THE ABSTRACT, an interpretation rather than a reproduction:

1. :func:`dedupe`: drop empty items and exact / near duplicates (same text after
   :func:`normalise_text`), keeping the first occurrence.
2. :func:`score_examples`: score every example with the frozen base model, no gradients: the
   per-example task loss, and for prompt/answer data also the instruction-following difficulty
   IFD = loss(answer | prompt) / loss(answer) (Li et al., 2023, "From Quantity to Quality",
   arXiv:2308.12032). Both losses average over exactly the same answer tokens (those
   :func:`senslora.data.examples.make_batches` labels); the bare answer starts with the tokenizer's BOS, or
   EOS when it has none. Cost: one forward pass per example, two with IFD.
3. :func:`select_by_quality`: keep a fraction (default 0.5) by a named rule (:data:`RULES`).

Default rules (``rule="auto"``):

* ``trimmed-loss-high`` (classification / regression): examples the frozen model already fits
  (low loss) teach little, while the very highest losses are often label noise. So the top
  ``noise_fraction`` (default 5%) of losses are set aside as suspected noise, and the rest are kept
  from the highest loss down. Caveat: with a freshly initialised task head the loss partly reflects
  the random head, so this signal is weaker for classification than for generation.
* ``ifd`` (prompt/answer data): as in Li et al., items with IFD > 1 (the prompt does not help
  predict the answer) are set aside first, and the rest are kept from the highest IFD down (the
  instructions the model finds hardest to follow are the most informative).

Classification data is selected per label (:func:`_stratified`): each class keeps its share of
the kept count, in the rule's order within the class. Without this, a loss ranked under a freshly
initialised head, which favours one class, keeps mostly the other class, and the model trained on
it predicts one class (seen as chance accuracy on movie-polarity in an earlier benchmark run, since
replaced).

Set-aside items are used only when too few others remain (least suspicious first), so the kept
count is always ``floor(keep * n)``. The simple alternatives ``loss-high`` and ``loss-low`` rank by
the loss alone, with no filter. Ties are broken by position, so a selection is deterministic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import SensloraError
from ..core.losses import IGNORE_INDEX
from ..data.batches import pad_rows, padding_id

RULES = ("auto", "trimmed-loss-high", "loss-high", "loss-low", "ifd")
SCORE_KINDS = ("classification", "regression", "causal-lm")

_WS = re.compile(r"\s+")


# ------------------------------------------------------------------------------------ dedupe
def normalise_text(s: str) -> str:
    """Casefold, drop punctuation, collapse whitespace: ``"Hello,  World!"`` -> ``"hello world"``."""
    # NFKC first so that compatibility forms (full-width letters, ligatures) compare equal.
    s = unicodedata.normalize("NFKC", s).casefold()
    # Remove every Unicode punctuation character (categories P*); symbols and emoji stay.
    s = "".join(ch for ch in s if not unicodedata.category(ch).startswith("P"))
    return _WS.sub(" ", s).strip()


def _is_generation(ex: Any) -> bool:
    return getattr(ex, "prompt", None) is not None and getattr(ex, "answer", None) is not None


def _fields(ex: Any) -> list[str]:
    """The texts that identify an example: prompt and answer, or text (and text_pair)."""
    if _is_generation(ex):
        return [ex.prompt, ex.answer]
    return [ex.text or ""] + ([ex.text_pair] if getattr(ex, "text_pair", None) is not None else [])


def _digest(parts: Sequence[str]) -> str:
    # A separator that normalised text cannot contain keeps ("a b", "c") apart from ("a", "b c").
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def example_id(ex: Any, index: int) -> str:
    """The example's id, or ``#index`` when it has none."""
    ex_id = getattr(ex, "id", "")
    return str(ex_id) if ex_id not in (None, "") else f"#{index}"


def dedupe(examples: Sequence[Any]) -> tuple[list[Any], list[dict[str, str]]]:
    """Drop empty items and exact / near duplicates, keeping the first occurrence.

    An item is empty when its text (for prompt/answer data: its prompt or its answer) is blank.
    Two items are near duplicates when their texts agree after :func:`normalise_text` (texts that
    normalise to nothing, e.g. ``":)"``, are compared casefolded instead). Prompt/answer items are
    compared on prompt and answer together, pairs on both texts.

    Returns ``(kept, dropped)``: the kept examples (each with a non-empty ``id``; missing ids become
    ``#<index in the input>``) and ``[{"id": ..., "reason": ...}]`` for the dropped ones.
    """
    kept: list[Any] = []
    dropped: list[dict[str, str]] = []
    exact: dict[str, str] = {}
    near: dict[str, str] = {}
    seen_ids: set[str] = set()
    for i, ex in enumerate(examples):
        ex_id = example_id(ex, i)
        if ex_id in seen_ids:
            raise SensloraError(
                f"example id {ex_id!r} appears more than once; quality selection needs unique ids"
            )
        seen_ids.add(ex_id)
        if getattr(ex, "id", "") in (None, "") and dataclasses.is_dataclass(ex):
            ex = dataclasses.replace(ex, id=ex_id)
        parts = _fields(ex)
        if any(not (p or "").strip() for p in parts):
            what = "prompt or answer" if _is_generation(ex) else "text"
            dropped.append({"id": ex_id, "reason": f"empty {what}"})
            continue
        raw_key = _digest(parts)
        near_key = _digest([normalise_text(p) or p.strip().casefold() for p in parts])
        if raw_key in exact:
            dropped.append({"id": ex_id, "reason": f"duplicate of {exact[raw_key]}"})
            continue
        if near_key in near:
            dropped.append({"id": ex_id, "reason": f"near-duplicate of {near[near_key]}"})
            continue
        exact[raw_key] = ex_id
        near[near_key] = ex_id
        kept.append(ex)
    return kept, dropped


# ------------------------------------------------------------------------------------ scoring
def _answer_start(tokenizer: Any) -> list[int]:
    """Tokens put before a bare answer: the tokenizer's BOS prefix, else EOS (the GPT-style
    document separator), so that the answer's first token is predicted as in the prompted case."""
    from ..data.examples import bos_prefix

    prefix = bos_prefix(tokenizer)
    if not prefix and tokenizer.eos_token_id is not None:
        prefix = [int(tokenizer.eos_token_id)]
    return prefix


def _answer_only_batches(
    answers: Sequence[list[int]], start: list[int], pad_id: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Right-padded causal-LM batches of ``start + answer`` with labels on the answer tokens only."""
    out: list[dict[str, torch.Tensor]] = []
    for s in range(0, len(answers), batch_size):
        chunk = [start + list(a) for a in answers[s : s + batch_size]]
        width = max(max(len(q) for q in chunk), 1)
        input_ids, mask = pad_rows(chunk, pad_id, width=width)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, q in enumerate(chunk):
            # Loss on the answer tokens only, never on the start tokens or padding.
            labels[row, len(start) : len(q)] = input_ids[row, len(start) : len(q)]
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return out


@torch.no_grad()
def _batch_losses(
    model, batches, device, *, progress: bool, desc: str
) -> tuple[list[float], list[int | None]]:
    """Per-example loss of every row, and for token labels the number of counted tokens."""
    from tqdm.auto import tqdm

    from ..core.losses import move_batch, per_example_loss

    losses: list[float] = []
    counts: list[int | None] = []
    for b in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        labels = b["labels"]
        losses.extend(float(v) for v in per_example_loss(model, move_batch(b, device)).detach().cpu())
        if labels.shape == b["input_ids"].shape:
            # Tokens that count in the causal-LM loss: labels shifted by one, not -100.
            counts.extend(int(c) for c in (labels[:, 1:] != IGNORE_INDEX).sum(dim=1))
        else:
            counts.extend([None] * labels.shape[0])
    return losses, counts


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def score_examples(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    kind: str,
    max_length: int = 128,
    batch_size: int = 8,
    device=None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every example with the frozen model (eval mode, no grad; the mode is restored).

    Returns one dict per example, in order: ``id`` and ``loss`` (the task loss of
    :func:`senslora.core.losses.per_example_loss` on :func:`senslora.data.examples.make_batches` output); for
    ``causal-lm`` also ``tokens`` (counted answer tokens; ``loss`` is ``None`` when there are
    none), and for prompt/answer examples ``loss_answer`` (the same answer tokens after only a
    BOS / EOS start token) and ``ifd`` = ``loss / loss_answer`` (``None`` if undefined).
    """
    from ..data.examples import make_batches

    if kind not in SCORE_KINDS:
        raise SensloraError(f"quality scoring supports {', '.join(SCORE_KINDS)} data, not {kind!r}")
    if not examples:
        raise SensloraError("no examples to score; the training set is empty")
    if kind != "causal-lm" and any(getattr(ex, "label", None) is None for ex in examples):
        raise SensloraError(
            f"quality scoring of {kind} data needs a label on every example; pass --label-column"
        )
    ids = [example_id(ex, i) for i, ex in enumerate(examples)]
    device = device or next(model.parameters()).device
    batches = make_batches(examples, tokenizer, kind=kind, max_length=max_length, batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        # Forward 1: the task loss (for prompt/answer data: loss(answer | prompt)).
        losses, counts = _batch_losses(model, batches, device, progress=progress, desc="quality: loss")
        results: list[dict[str, Any]] = []
        for ex_id, loss, count in zip(ids, losses, counts, strict=True):
            row: dict[str, Any] = {"id": ex_id, "loss": _finite_or_none(loss)}
            if count is not None:
                row["tokens"] = count
                if count == 0:
                    row["loss"] = None  # nothing was scored (answer truncated away)
            results.append(row)
        gen_rows = [i for i, ex in enumerate(examples) if _is_generation(ex)] if kind == "causal-lm" else []
        if gen_rows:
            # Forward 2: loss(answer) alone, on exactly the labelled (answer) tokens of forward 1, so
            # both losses average over the same tokens.
            gen_set = set(gen_rows)
            answers: list[list[int]] = []
            for b, offset in zip(batches, _offsets(batches), strict=True):
                for r in range(b["input_ids"].shape[0]):
                    if offset + r in gen_set:
                        answers.append(b["input_ids"][r][b["labels"][r] != IGNORE_INDEX].tolist())
            answer_batches = _answer_only_batches(
                answers, _answer_start(tokenizer), padding_id(tokenizer), batch_size
            )
            a_losses, a_counts = _batch_losses(
                model, answer_batches, device, progress=progress, desc="quality: IFD"
            )
            for i, a_loss, a_count in zip(gen_rows, a_losses, a_counts, strict=True):
                row = results[i]
                a_loss = _finite_or_none(a_loss) if a_count else None
                row["loss_answer"] = a_loss
                # IFD = loss(answer | prompt) / loss(answer); undefined when either is missing or loss(answer) = 0.
                cond = row["loss"]
                row["ifd"] = cond / a_loss if cond is not None and a_loss is not None and a_loss > 0 else None
    finally:
        model.train(was_training)
    return results


def _offsets(batches: Sequence[Mapping[str, torch.Tensor]]) -> list[int]:
    out, total = [], 0
    for b in batches:
        out.append(total)
        total += int(b["input_ids"].shape[0])
    return out


# ---------------------------------------------------------------------------------- selection
def _resolve_rule(rule: str, scores: Sequence[Mapping[str, Any]]) -> str:
    if rule not in RULES:
        raise SensloraError(f"unknown quality rule {rule!r}; use one of {', '.join(RULES)}")
    has_ifd = any("ifd" in s for s in scores)
    if rule == "auto":
        return "ifd" if has_ifd else "trimmed-loss-high"
    if rule == "ifd" and not has_ifd:
        raise SensloraError(
            "the 'ifd' quality rule needs prompt/answer examples scored as causal-lm; use loss-high"
        )
    return rule


def keep_count(n: int, keep: float) -> int:
    """``floor(keep * n)`` after checking ``keep`` in (0, 1] and that it keeps at least one of >= 2."""
    try:
        ok = not isinstance(keep, bool) and math.isfinite(float(keep)) and 0 < float(keep) <= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SensloraError(f"--data-keep must be in (0, 1], got {keep!r}")
    if n < 2:
        raise SensloraError(
            f"quality selection needs at least 2 distinct, non-empty examples, got {n}; pass more data"
        )
    # Small epsilon so that e.g. 0.3 * 10 = 3.0000000000000004 floors to 3 and 0.57 * 100 to 57.
    k = math.floor(float(keep) * n + 1e-9)
    if k < 1:
        raise SensloraError(f"--data-keep {keep} keeps 0 of {n} examples; raise it or pass more data")
    return k


def select_by_quality(
    examples: Sequence[Any],
    scores: Sequence[Mapping[str, Any]],
    keep: float = 0.5,
    *,
    rule: str = "auto",
    noise_fraction: float = 0.05,
    stratify: bool = False,
) -> tuple[list[Any], dict[str, Any]]:
    """Keep ``floor(keep * n)`` examples by ``rule`` (see the module docstring and :data:`RULES`).

    ``stratify`` (classification): each label keeps its share of the ``k`` items (largest
    remainder), taken in the rule's order within that label, so the kept set has the class
    balance of the input.

    ``scores`` come from :func:`score_examples` on the same examples. Returns the kept examples
    (in their original order) and a record: ``rule`` (resolved), ``keep``, ``n``, ``k``,
    ``kept_ids``, ``dropped`` (``[{"id", "reason"}]``), ``score_key`` (``loss`` or ``ifd``),
    ``cut`` (the score of the last kept item in rank order) and ``noise_fraction``.
    """
    if len(scores) != len(examples):
        raise ValueError(f"{len(scores)} scores for {len(examples)} examples")
    n = len(examples)
    k = keep_count(n, keep)
    resolved = _resolve_rule(rule, scores)
    if not 0 <= noise_fraction < 1:
        raise SensloraError(f"the noise fraction must be in [0, 1), got {noise_fraction}")
    key = "ifd" if resolved == "ifd" else "loss"
    values = [_finite_or_none(s.get(key)) for s in scores]
    scorable = [i for i in range(n) if values[i] is not None]
    missing = [i for i in range(n) if values[i] is None]
    why_missing = (
        "no IFD (not a prompt/answer pair, or no answer tokens)"
        if key == "ifd"
        else "no loss (no tokens to score)"
    )
    reason_set_aside: dict[int, str] = {i: why_missing for i in missing}

    # Rank order: preferred candidates first, then set-aside ones (least suspicious first), then unscorable.
    if resolved == "loss-low":
        preferred = sorted(scorable, key=lambda i: (values[i], i))
        set_aside: list[int] = []
    elif resolved == "loss-high":
        preferred = sorted(scorable, key=lambda i: (-values[i], i))
        set_aside = []
    elif resolved == "trimmed-loss-high":
        ranked = sorted(scorable, key=lambda i: (-values[i], i))
        # The top noise_fraction of losses are suspected label noise.
        m = math.floor(noise_fraction * len(ranked) + 1e-9)
        preferred, suspects = ranked[m:], ranked[:m]
        set_aside = suspects[::-1]  # lowest of the suspects first
        for i in suspects:
            reason_set_aside[i] = f"loss in the top {noise_fraction:g} (likely label noise)"
    else:  # ifd
        # IFD > 1: the prompt makes the answer harder to predict, i.e. prompt and answer do not match.
        preferred = sorted((i for i in scorable if values[i] <= 1), key=lambda i: (-values[i], i))
        set_aside = sorted((i for i in scorable if values[i] > 1), key=lambda i: (values[i], i))
        for i in set_aside:
            reason_set_aside[i] = "IFD > 1 (the prompt does not help predict the answer)"
    order = preferred + set_aside + missing
    if stratify:
        chosen = _stratified(order, [getattr(ex, "label", None) for ex in examples], k)
    else:
        chosen = order[:k]
    chosen_set = set(chosen)
    dropped = []
    for rank, i in enumerate(order):
        if i in chosen_set:
            continue
        reason = reason_set_aside.get(i, f"below the cut ({key} rank {rank + 1} of {n}, {k} kept)")
        dropped.append({"id": str(scores[i]["id"]), "reason": reason})
    kept_idx = sorted(chosen)
    cut = values[chosen[-1]] if chosen and values[chosen[-1]] is not None else None
    noise_cut = None
    if resolved == "trimmed-loss-high" and set_aside:
        noise_cut = values[set_aside[0]]
    record = {
        "rule": resolved,
        "requested_rule": rule,
        "stratified": bool(stratify),
        "keep": float(keep),
        "n": n,
        "k": k,
        "score_key": key,
        "cut": cut,
        "noise_cut": noise_cut,
        "noise_fraction": noise_fraction if resolved == "trimmed-loss-high" else None,
        "set_aside_used": sum(1 for i in chosen if i in reason_set_aside),
        "kept_ids": [str(scores[i]["id"]) for i in kept_idx],
        "dropped": dropped,
    }
    return [examples[i] for i in kept_idx], record


def _stratified(order: Sequence[int], labels: Sequence[Any], k: int) -> list[int]:
    """The first items of ``order`` per label, ``k`` in all, each label keeping its share.

    Shares are ``k * n_label / n`` rounded by largest remainder (ties to the label seen first in
    ``order``); the result keeps ``order``'s ranking, so its last item is the weakest kept one.
    """
    if any(label is None for label in labels):
        raise SensloraError("stratified quality selection needs a label on every example")
    groups: dict[Any, list[int]] = {}
    for i in order:
        groups.setdefault(labels[i], []).append(i)
    n = len(order)
    exact = {label: k * len(members) / n for label, members in groups.items()}
    quota = {label: math.floor(q + 1e-9) for label, q in exact.items()}
    rest = k - sum(quota.values())
    first_seen = list(groups)  # dict order = order of first appearance in ``order``
    for label in sorted(first_seen, key=lambda g: (-(exact[g] - quota[g]), first_seen.index(g)))[:rest]:
        quota[label] += 1
    keep = {i for label, members in groups.items() for i in members[: quota[label]]}
    return [i for i in order if i in keep]


@dataclass
class QualitySelection:
    """The whole data-quality selection: scores, kept ids, dropped items with reasons, timings."""

    scores: list[dict[str, Any]]
    kept_ids: list[str]
    dropped: list[dict[str, str]]
    rule: str
    keep: float
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything ``selection.json`` holds."""
        n_dedupe = sum(1 for d in self.dropped if d.get("stage") == "dedupe")
        return {
            "rule": self.rule,
            "keep": self.keep,
            "counts": {
                "input": len(self.scores) + n_dedupe,
                "dropped_by_dedupe": n_dedupe,
                "scored": len(self.scores),
                "kept": len(self.kept_ids),
                "dropped": len(self.dropped),
            },
            "timings": self.timings,
            **{k: v for k, v in self.details.items() if k not in ("kept_ids", "dropped", "rule", "keep")},
            "kept_ids": self.kept_ids,
            "dropped": self.dropped,
        }

    def save(self, out_dir: str | Path, *, plot: bool = True, overwrite: bool = False) -> Path:
        """Write ``scores.jsonl``, ``selection.json`` and ``scores.png`` atomically."""
        from ..core.cache import atomic_dir

        out = Path(out_dir)
        if out.exists() and not overwrite:
            raise SensloraError(f"output folder {out} already exists; remove it or pass --overwrite")
        with atomic_dir(out) as tmp:
            (tmp / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in self.scores))
            (tmp / "selection.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
            if plot:
                self.plot(tmp / "scores.png")
        return out

    def plot(self, path: str | Path) -> None:
        """Histogram of the ranking score with the cut (and the noise cut) marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = self.details.get("score_key", "loss")
        values = [s[key] for s in self.scores if s.get(key) is not None and math.isfinite(s[key])]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:gray")
        cut = self.details.get("cut")
        if cut is not None:
            ax.axvline(cut, color="tab:orange", lw=2, label=f"cut ({key} = {cut:.3g})")
        noise_cut = self.details.get("noise_cut")
        if noise_cut is not None:
            ax.axvline(noise_cut, color="tab:red", lw=1.5, ls="--", label="suspected-noise cut")
        if key == "ifd":
            ax.axvline(1.0, color="black", lw=1, ls=":", label="IFD = 1")
        ax.set_xlabel(key)
        ax.set_ylabel("examples")
        ax.set_title(f"{self.rule}: kept {len(self.kept_ids)} of {len(self.scores)} scored")
        if cut is not None or noise_cut is not None or key == "ifd":
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def select_training_data(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    kind: str,
    keep: float = 0.5,
    rule: str = "auto",
    noise_fraction: float = 0.05,
    max_length: int = 128,
    batch_size: int = 8,
    device=None,
    progress: bool = True,
    measure_forward: bool = True,
) -> tuple[list[Any], QualitySelection]:
    """Dedupe, score and select in one call; returns the kept examples and the full record.

    ``timings``: ``dedupe``, ``score`` (all scoring passes) and, with ``measure_forward``,
    ``forward``: one plain forward pass over the same (prompted) batches, the reference cost.
    """
    from ..core.timing import time_forward
    from ..data.examples import make_batches

    # Check the options before any model work.
    keep_count(max(len(examples), 2), keep)
    if rule not in RULES:
        raise SensloraError(f"unknown quality rule {rule!r}; use one of {', '.join(RULES)}")
    if rule == "ifd" and kind != "causal-lm":
        raise SensloraError(
            "the 'ifd' quality rule needs prompt/answer examples scored as causal-lm; use loss-high"
        )
    timings: dict[str, float] = {}
    start = time.perf_counter()
    kept0, dropped0 = dedupe(examples)
    timings["dedupe"] = time.perf_counter() - start
    keep_count(len(kept0), keep)
    device = device or next(model.parameters()).device
    if measure_forward:
        batches = make_batches(kept0, tokenizer, kind=kind, max_length=max_length, batch_size=batch_size)
        time_forward(model, batches[:1], device)  # warm-up
        timings["forward"] = time_forward(model, batches, device)
    start = time.perf_counter()
    scores = score_examples(
        model,
        tokenizer,
        kept0,
        kind=kind,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    timings["score"] = time.perf_counter() - start
    kept, record = select_by_quality(
        kept0, scores, keep, rule=rule, noise_fraction=noise_fraction, stratify=kind == "classification"
    )
    dropped = [{**d, "stage": "dedupe"} for d in dropped0] + [
        {**d, "stage": "quality"} for d in record["dropped"]
    ]
    selection = QualitySelection(
        scores=scores,
        kept_ids=record["kept_ids"],
        dropped=dropped,
        rule=record["rule"],
        keep=float(keep),
        timings=timings,
        details=record,
    )
    return kept, selection
