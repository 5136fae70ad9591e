"""Task metrics and model evaluation, offline (no HF ``evaluate``, which downloads metric scripts).

* classification: accuracy, F1 (binary: F1 of class 1; more classes: macro F1) and Matthews
  correlation, from scikit-learn;
* regression: Pearson and Spearman correlation from SciPy (0.0 when undefined, e.g. constant
  predictions, the convention scikit-learn uses for Matthews);
* generation: corpus BLEU-4 from sacrebleu (0-100, its default 13a tokenisation) and ROUGE-1/2/L
  F-measures from rouge-score (0-1, Porter stemming), averaged over examples.

:func:`evaluate_model` adds ``eval_loss``: the mean over examples of each example's task loss
(:func:`senslora.core.losses.per_example_loss`; for causal LMs the mean over the answer tokens).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..core.errors import SensloraError
from ..core.losses import model_inputs, move_batch, per_example_loss
from ..data.batches import pad_rows, padding_id
from ..data.examples import Example, make_batches, prompt_ids

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _correlation(fn, x: Sequence[float], y: Sequence[float]) -> float:
    import numpy as np

    if len(x) < 2 or np.ptp(np.asarray(x, dtype=float)) == 0 or np.ptp(np.asarray(y, dtype=float)) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(x, y)[0])
    return value if math.isfinite(value) else 0.0


def compute_metrics(
    problem: str, predictions: Sequence[Any], references: Sequence[Any], *, num_labels: int | None = None
) -> dict[str, float]:
    """Metrics of ``predictions`` against ``references``.

    Args:
        problem: ``classification`` (class indices), ``regression`` (numbers) or ``generation`` (strings).
        num_labels: classes of a classification task; ``None`` infers binary when every label is 0 or 1.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise SensloraError("nothing to evaluate: the evaluation split is empty")
    if problem == "classification":
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

        preds = [int(p) for p in predictions]
        refs = [int(r) for r in references]
        binary = num_labels == 2 if num_labels is not None else set(preds) | set(refs) <= {0, 1}
        if binary:
            f1 = f1_score(refs, preds, average="binary", pos_label=1, zero_division=0)
        else:
            labels = list(range(num_labels)) if num_labels is not None else sorted(set(preds) | set(refs))
            f1 = f1_score(refs, preds, labels=labels, average="macro", zero_division=0)
        return {
            "accuracy": float(accuracy_score(refs, preds)),
            "f1": float(f1),
            "matthews": float(matthews_corrcoef(refs, preds)),
        }
    if problem == "regression":
        from scipy.stats import pearsonr, spearmanr

        preds = [float(p) for p in predictions]
        refs = [float(r) for r in references]
        return {
            "pearson": _correlation(pearsonr, preds, refs),
            "spearman": _correlation(spearmanr, preds, refs),
        }
    if problem == "generation":
        import sacrebleu
        from rouge_score import rouge_scorer

        preds = [str(p) for p in predictions]
        refs = [str(r) for r in references]
        out = {"bleu": float(sacrebleu.corpus_bleu(preds, [refs]).score)}
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        totals = dict.fromkeys(ROUGE_TYPES, 0.0)
        for pred, ref in zip(preds, refs, strict=True):
            scores = scorer.score(ref, pred)
            for key in ROUGE_TYPES:
                totals[key] += scores[key].fmeasure
        out.update({key: totals[key] / len(refs) for key in ROUGE_TYPES})
        return out
    raise SensloraError(f"unknown problem {problem!r}; choose classification, regression or generation")


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


@torch.no_grad()
def _predict_and_loss(model, batches: list[dict], problem: str, device, progress: bool) -> tuple[list, float]:
    """Predictions (class index or number; none for causal LMs) and the mean per-example loss."""
    predictions: list = []
    loss_sum, count = 0.0, 0
    for batch in _progress(batches, len(batches), "evaluate", progress):
        batch = move_batch(batch, device)
        if problem == "generation":
            losses = per_example_loss(model, batch)
        else:
            logits = model(**model_inputs(batch)).logits.float()
            if problem == "classification":
                predictions.extend(int(i) for i in logits.argmax(dim=-1).cpu())
            else:
                predictions.extend(float(v) for v in logits.squeeze(-1).cpu())
            losses = _loss_from_logits(logits, batch["labels"])
        loss_sum += float(losses.sum())
        count += len(losses)
    return predictions, loss_sum / count


def _loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The same losses as per_example_loss, without a second forward pass.
    import torch.nn.functional as F

    if labels.is_floating_point():
        return (logits.squeeze(-1) - labels.to(logits.dtype)).square()
    return F.cross_entropy(logits, labels, reduction="none")


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str | Example],
    *,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    device,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to ``prompts`` (texts, or examples: a conversation is answered after its
    turns before the last assistant turn), built exactly as in training (:func:`prompt_ids`: the
    chat template or ``prompt + "\\n"``; TRL-style prompt-completion pairs as they are).

    Prompts are truncated from the left to ``max_length`` tokens and left-padded in batches.
    """
    from transformers import GenerationConfig

    examples = [p if isinstance(p, Example) else Example(p, prompt=p) for p in prompts]
    encoded = [prompt_ids(ex, tokenizer)[-max_length:] for ex in examples]
    pad = padding_id(tokenizer)
    eos = tokenizer.eos_token_id
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos
    )
    answers: list[str] = []
    starts = range(0, len(encoded), batch_size)
    for start in _progress(starts, len(starts), "generate", progress):
        chunk = encoded[start : start + batch_size]
        input_ids, attention = pad_rows(chunk, pad, left=True)
        width = input_ids.shape[1]
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=gen_config
        )
        for row in output[:, width:].cpu():
            answers.append(tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
    return answers


def evaluate_model(
    model,
    tokenizer,
    examples: Sequence[Example],
    task,
    *,
    batch_size: int = 16,
    max_length: int = 128,
    max_new_tokens: int = 32,
    device=None,
    progress: bool = False,
    predictions_out: list | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``examples`` of ``task`` (a :class:`senslora.data.tasks.TaskData`).

    ``predictions_out``: a list that receives the predictions (class indices, numbers or answers).

    Classification: argmax of the logits; regression: the single logit; generation: the loss on the
    reference answers plus greedy answers (``max_new_tokens``) for BLEU / ROUGE. Returns the task's
    metrics and ``eval_loss``. The model is put in eval mode and its mode restored afterwards.
    """
    if not examples:
        raise SensloraError(f"nothing to evaluate: no examples of {task.name}")
    device = device or next(model.parameters()).device
    kind = task.model_kind
    batches = make_batches(list(examples), tokenizer, kind=kind, max_length=max_length, batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        predictions, loss = _predict_and_loss(model, batches, task.problem, device, progress)
        if task.problem == "generation":
            predictions = generate_answers(
                model,
                tokenizer,
                list(examples),
                batch_size=batch_size,
                max_length=max_length,
                max_new_tokens=max_new_tokens,
                device=device,
                progress=progress,
            )
            references = [ex.answer for ex in examples]
        else:
            references = [ex.label for ex in examples]
    finally:
        model.train(was_training)
    metrics = compute_metrics(task.problem, predictions, references, num_labels=task.num_labels or None)
    metrics["eval_loss"] = loss
    if predictions_out is not None:
        predictions_out.extend(predictions)
    return metrics


# A regressor whose R² is at most this learned (almost) nothing beyond the mean label: collapsed
# runs in results/v2 `main` had Pearson 0.03-0.18 and a test MSE equal to the labels' variance.
COLLAPSED_R2 = 0.01


def collapse_warning(
    problem: str, predictions: Sequence[Any], references: Sequence[Any], split: str
) -> str | None:
    """A warning when the trained model collapsed, else None: a classifier that predicted one class
    for every example of ``split`` (its accuracy is that class's share), or a regressor whose
    squared error is no better than predicting the mean label (R² <= ``COLLAPSED_R2``, scikit-learn's
    ``r2_score``). Generation is never flagged."""
    if problem == "classification":
        classes = {int(p) for p in predictions}
        if len(classes) != 1:
            return None
        return (
            f"the trained classifier predicts class {classes.pop()} for all {len(predictions)} {split} examples "
            "(it learned nothing beyond the majority class); try another --lr (docs/CLI.md: learning rates)"
        )
    if problem == "regression" and len(predictions) > 1 and len(set(references)) > 1:
        from sklearn.metrics import r2_score

        r2 = float(r2_score([float(r) for r in references], [float(p) for p in predictions]))
        if r2 <= COLLAPSED_R2:
            return (
                f"the trained regressor is no better than predicting the mean label on the {len(predictions)} "
                f"{split} examples (R² {r2:.3f}); try another --lr (docs/CLI.md: learning rates)"
            )
    return None
