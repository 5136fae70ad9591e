"""Full fine-tuning (``full``): every parameter trainable, the upper reference of the comparison.

Not budget-matched (it trains the whole model). Saved as one ``model.safetensors`` of the whole
state (tied weights stored once) and loaded into a fresh base model of the same architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .base import Method, MethodContext, register

WEIGHTS_NAME = "model.safetensors"


@register
class Full(Method):
    """All parameters trainable."""

    name = "full"
    is_peft = False

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        self.record.update(budget="none (all parameters)")
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        from safetensors.torch import save_model

        save_model(model, str(Path(out_dir) / WEIGHTS_NAME))

    def load(self, base_model: nn.Module, adapter_dir: Path, ctx: MethodContext) -> nn.Module:
        from safetensors.torch import load_model

        load_model(base_model, str(Path(adapter_dir) / WEIGHTS_NAME), strict=True)
        return base_model

    def merge(self, model: nn.Module) -> nn.Module:
        """The trained model is already a plain model."""
        return model
