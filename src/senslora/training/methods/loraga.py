"""LoRA-GA (Wang et al., 2024, arXiv 2407.05000) through PEFT: uniform LoRA initialised from the SVD
of the calibration set's mean task-loss gradient (PEFT's ``init_lora_weights="lora_ga"`` with its
defaults, ``direction="ArB2r"``, ``scale="stable"``, ``stable_gamma = 16``).

It is ``lora`` (same rank on every target, the same budget exactly) with the ``init`` option
fixed (:mod:`senslora.core.inits`). LoRA-GA subtracts the initial adapter product from the base
weights, so the saved adapter is converted by PEFT into a plain LoRA adapter of twice the rank that
loads on the original model (:meth:`Method.save`).
"""

from __future__ import annotations

from .base import register
from .lora import LoRA


@register
class LoRAGA(LoRA):
    """Uniform LoRA initialised by PEFT's LoRA-GA."""

    name = "lora-ga"
    implied_options = {"init": "lora-ga"}
