"""Which weight matrices get LoRA (METHOD.md section 2).

Default: every ``nn.Linear`` (and GPT-2 ``Conv1D``) inside the transformer blocks, i.e. inside the
largest ``nn.ModuleList`` of identical blocks; never embeddings, never the task head / ``lm_head``,
never a mixture-of-experts router (:data:`ROUTERS`: its few outputs are the expert scores, e.g.
Qwen2-MoE's one-output ``shared_expert_gate``; LLaMA-Factory's ``lora_target: all`` leaves them out too).
Users override with a regex (matched with ``re.search`` against full module names) or an explicit
list of names (exact, or a ``.``-suffix of the full name, as PEFT matches ``target_modules``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

from .errors import SensloraError

#: Last name components of the mixture-of-experts routers that are plain ``nn.Linear`` layers
#: (``gate``: Qwen-MoE, Mixtral-style; ``router``: Jamba, DBRX-style). ``gate_proj`` is not one.
ROUTERS = frozenset({"gate", "router", "shared_expert_gate"})


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight stored as (d_in, d_out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or Conv1D, in nn.Linear convention. A Linear's own
    ``out_features`` / ``in_features``, not its weight's shape: a quantised Linear (bitsandbytes'
    4-bit, QLoRA's base) stores its weight packed, e.g. (d_out * d_in / 2, 1) bytes."""
    if _is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_out), int(d_in)
    return int(module.out_features), int(module.in_features)


def quantized(module: nn.Module) -> bool:
    """Whether a linear layer stores its weight quantised (bitsandbytes' 4-bit ``Params4bit`` or
    8-bit ``Int8Params``: packed integers, the base of QLoRA): it has no weight gradient, and its
    values are not the matrix's until dequantised."""
    return not module.weight.is_floating_point()


def quantization(modules) -> str:
    """How the weights of linear ``modules`` are stored: ``"4bit"`` / ``"8bit"`` (bitsandbytes'
    ``Params4bit`` / ``Int8Params``), another integer dtype's name, or ``""`` (floating point)."""
    for module in modules:
        if quantized(module):
            kind = type(module.weight).__name__
            return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind, str(module.weight.dtype).removeprefix("torch."))
    return ""


@dataclass(frozen=True)
class Target:
    """One target weight matrix."""

    name: str  # full module name inside the model given to find_targets
    module: nn.Module
    layer: int | None  # index of the transformer block, None if outside the blocks
    shape: tuple[int, int]  # (d_out, d_in)

    @property
    def quantized(self) -> bool:
        return quantized(self.module)

    @property
    def lora_params_per_rank(self) -> int:
        """Trainable parameters one unit of LoRA rank costs on this matrix: d_in + d_out."""
        return self.shape[0] + self.shape[1]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's transformer blocks: the largest non-empty ModuleList whose children share one
    class and hold a linear layer (the first such list wins a tie), or None."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1:
                continue
            if not any(is_linear(m) for m in module[0].modules()):
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def _layer_of(name: str, blocks_prefix: str | None) -> int | None:
    if blocks_prefix is None:
        return None
    prefix = blocks_prefix + "." if blocks_prefix else ""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
) -> list[Target]:
    """List the target matrices in module order.

    Args:
        model: any torch model (HF or not).
        target_modules: ``None`` for the default (all linears inside the blocks), a regex string
            searched in full names, or a list of names (exact or ``.``-suffix match).
        layers: if given, keep only targets in these block indices (CKA layer selection).
    """
    blocks = find_blocks(model)
    blocks_prefix = blocks[0] if blocks else None
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise SensloraError(f"invalid --targets regex {target_modules!r}: {exc}") from None
    targets: list[Target] = []
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        layer = _layer_of(name, blocks_prefix)
        if target_modules is None:
            selected = layer is not None and name.rpartition(".")[2] not in ROUTERS
        elif isinstance(target_modules, str):
            selected = pattern.search(name) is not None
        else:
            selected = any(name == t or name.endswith("." + t) for t in target_modules)
        if not selected:
            continue
        if layers is not None and layer not in set(layers):
            continue
        targets.append(Target(name=name, module=module, layer=layer, shape=weight_shape(module)))
    if not targets:
        what = (
            "the default (linear layers inside transformer blocks)"
            if target_modules is None
            else repr(target_modules)
        )
        raise SensloraError(
            f"no target matrix in the model matches {what}; pass --targets with a regex that names some nn.Linear modules"
        )
    return targets
