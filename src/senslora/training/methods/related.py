"""The two related systems as methods (METHOD.md section 7: TsqLoRA and layer-wise LoRA with CKA).

- ``cka``: layer-wise LoRA by CKA (the layer-wise LoRA with CKA paper): uniform LoRA only on the ``floor(layer_ratio x L)``
  blocks whose input and output hidden states are least similar (``--layer-ratio``, default 0.5).
  The selection runs in :func:`senslora.training.train.train` (``layer_select="cka"``), which hands the
  kept blocks to the method as ``options["layers"]``. ``--method senslora --layers cka`` composes
  it with sensitivity allocation (the budget is spread over the kept blocks only).
- ``tsqlora``: TsqLoRA (Chen et al., 2025) as we read its abstract; it has no public code. Data-quality
  selection with the frozen base model (:mod:`senslora.training.quality`, ``data_select="quality"``, keep
  ``--data-keep``, default 0.5) followed by Sensitivity-LoRA ranks. ``--data-select quality``
  composes the selection with any other method.
"""

from __future__ import annotations

from .base import register
from .lora import LoRA, SensLoRA


@register
class CKALoRA(LoRA):
    """Uniform LoRA on the blocks selected by layer-wise CKA."""

    name = "cka"
    implied_options = {"layer_select": "cka"}


@register
class TsqLoRA(SensLoRA):
    """Quality-selected training data + sensitivity-allocated ranks."""

    name = "tsqlora"
    implied_options = {"data_select": "quality"}
