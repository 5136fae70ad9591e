"""Helpers shared by the baseline methods: targets, the uniform-LoRA budget (PEFT task types:
:func:`senslora.data.models.peft_task_type`)."""

from __future__ import annotations

import torch.nn as nn

from ...core.errors import SensloraError
from ...core.targets import Target, find_targets
from .base import MethodContext


def method_targets(model: nn.Module, ctx: MethodContext) -> list[Target]:
    """The target matrices of the uniform-LoRA reference (``--targets`` / ``--layers`` honoured)."""
    return find_targets(model, ctx.options.get("target_modules"), ctx.options.get("layers"))


def uniform_rank(ctx: MethodContext, method: str) -> int:
    """The integer rank of the uniform-LoRA reference: ``avg_rank`` rounded, at least 1."""
    rank = round(ctx.avg_rank)
    if rank < 1:
        raise SensloraError(
            f"--avg-rank {ctx.avg_rank} is below 1; {method} needs an average rank of at least 1"
        )
    return rank


def lora_reference_params(targets: list[Target], rank: int) -> int:
    """Trainable parameters of uniform LoRA of ``rank`` on ``targets``: rank x sum(d_in + d_out)."""
    return rank * sum(t.lora_params_per_rank for t in targets)

