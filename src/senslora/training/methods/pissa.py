"""PiSSA (Meng et al., 2024, arXiv 2404.02948) through PEFT: uniform LoRA initialised with the
principal singular vectors of ``W`` (full SVD, PEFT's ``init_lora_weights="pissa"``); no data.

It is ``lora`` (same rank, the same budget exactly) with the ``init`` option fixed
(:mod:`senslora.core.inits`). PiSSA subtracts the initial adapter product from the base weights,
so the saved adapter is converted by PEFT into a plain LoRA adapter of twice the rank that loads on
the original model (:meth:`Method.save`).
"""

from __future__ import annotations

from .base import register
from .lora import LoRA


@register
class PiSSA(LoRA):
    """Uniform LoRA initialised by PEFT's PiSSA."""

    name = "pissa"
    implied_options = {"init": "pissa"}
