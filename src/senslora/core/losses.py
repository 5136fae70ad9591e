"""The calibration loss: the task loss per example, used by the ``fisher`` and ``hutchinson`` estimators.

The kind of task is read off the labels (METHOD.md section 3, "calibration loss"):

- ``labels`` shaped like ``input_ids``: causal LM, next-token cross-entropy averaged over each
  example's counted tokens (label ``-100`` is not counted);
- integer ``labels`` of shape ``(B,)``: classification cross-entropy on ``logits (B, C)``;
- float ``labels`` (or a single output logit): regression, squared error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from .errors import SensloraError

# Batch keys that are forwarded to the model; everything else (labels, bookkeeping) stays out,
# so HF models do not compute their own loss.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
IGNORE_INDEX = -100

LossFn = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of ``batch`` to pass to ``model(**...)``."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}


def move_batch(batch: Mapping[str, object], device: torch.device | str) -> dict[str, object]:
    """A copy of ``batch`` with every tensor on ``device`` (other values untouched)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a batch for ``model`` goes (a ``torch.device``): its first parameter's device, or for a
    model dispatched by accelerate (``hf_device_map``), the first execution device (a GPU if any,
    else the CPU)."""
    placement = getattr(model, "hf_device_map", None)
    if placement:
        for where in placement.values():
            if str(where) not in ("cpu", "disk", "meta"):
                return torch.device(f"cuda:{where}" if isinstance(where, int) else str(where))
        return torch.device("cpu")
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def offloaded(model: torch.nn.Module) -> bool:
    """Whether accelerate keeps some of ``model``'s weights off the execution devices (CPU/disk):
    those blocks visit the device one at a time and have no backward pass."""
    placement = getattr(model, "hf_device_map", None) or {}
    devices = {str(d) for d in placement.values()}
    return "disk" in devices or ("cpu" in devices and len(devices) > 1)


def _logits(output: object) -> torch.Tensor:
    # HF ModelOutput / dict with "logits", a tuple whose first item is the logits, or a bare tensor.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) or hasattr(output, "logits"):
        logits = output["logits"] if isinstance(output, Mapping) else output.logits
        if logits is not None:
            return logits
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SensloraError(
        f"the model returned {type(output).__name__} without logits; per_example_loss needs logits"
    )


def per_example_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Task loss of each example, shape ``(B,)``, float32, with autograd graph."""
    labels = batch.get("labels")
    if labels is None:
        raise SensloraError(
            "the calibration batch has no 'labels'; fisher / hutchinson need labelled data (or use --estimator activation)"
        )
    if "input_ids" not in batch:
        raise SensloraError("the calibration batch has no 'input_ids'")
    logits = _logits(model(**model_inputs(batch))).float()
    if logits.dim() == 3 and labels.shape != batch["input_ids"].shape:
        raise SensloraError(
            f"the calibration labels have shape {tuple(labels.shape)} but the model predicts every token "
            f"(logits {tuple(logits.shape)}); a causal LM needs labels shaped like input_ids"
        )

    if labels.shape == batch["input_ids"].shape:
        # Causal LM: position t predicts token t+1.
        logits, targets = logits[:, :-1], labels[:, 1:]
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(targets.shape)
        # Mean over each example's counted tokens; an example with none gives 0.
        counted = (targets != IGNORE_INDEX).sum(dim=1)
        return token_loss.sum(dim=1) / counted.clamp(min=1)

    if labels.is_floating_point() or logits.shape[-1] == 1:
        # Regression: squared error, averaged over the output dimensions of each example.
        pred = logits.squeeze(-1) if logits.shape[-1] == 1 else logits
        err = (pred - labels.to(pred.dtype)).square()
        return err.reshape(err.shape[0], -1).mean(dim=1)

    # Classification: cross-entropy of the logits (B, C) against integer labels (B,).
    return F.cross_entropy(logits, labels, reduction="none")
