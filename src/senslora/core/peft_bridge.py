"""Per-matrix ranks -> a PEFT ``LoraConfig`` (METHOD.md section 5, "scaling").

PEFT reads ``rank_pattern`` / ``alpha_pattern`` keys as regexes matched at the end of module
names (first match wins), so keys are the full, regex-escaped module names. Matrices with rank 0
are left out of ``target_modules`` (PEFT rejects r = 0).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from .errors import SensloraError

ALPHA_MODES = ("proportional", "constant", "rslora")


def lora_alpha_for(rank: int, *, base_rank: int, base_alpha: float, mode: str) -> float:
    """LoRA alpha of one matrix so that its scaling follows ``mode``.

    - proportional (default): alpha_w = alpha * r_w / r, so alpha_w / r_w equals the uniform run's alpha / r.
    - constant: alpha_w = alpha (PEFT's default behaviour; scaling alpha / r_w grows as rank shrinks).
    - rslora: alpha_w = alpha with rsLoRA scaling alpha / sqrt(r_w) (``use_rslora=True``).
    """
    if mode == "proportional":
        return base_alpha * rank / base_rank
    if mode in ("constant", "rslora"):
        return float(base_alpha)
    raise SensloraError(f"unknown alpha mode {mode!r}; choose one of {', '.join(ALPHA_MODES)}")


def ranks_to_lora_config(ranks: Mapping[str, int], base=None, *, alpha_mode: str = "proportional"):
    """Build a ``peft.LoraConfig`` giving each named module exactly its rank.

    Args:
        ranks: full module name -> rank (0 drops the module).
        base: a ``LoraConfig`` whose other fields (dropout, task_type, bias, r, lora_alpha, ...) are
            kept; its ``r`` / ``lora_alpha`` define the uniform reference scaling alpha / r.
            ``None`` gives ``LoraConfig(r=8, lora_alpha=16)``.
        alpha_mode: ``proportional`` | ``constant`` | ``rslora`` (see :func:`lora_alpha_for`).
    """
    from peft import LoraConfig

    if base is None:
        base = LoraConfig(r=8, lora_alpha=16)
    kept = {name: int(r) for name, r in ranks.items() if int(r) > 0}
    if not kept:
        raise SensloraError("every matrix was allocated rank 0; raise --avg-rank or --r-min")
    rank_pattern = {re.escape(name): r for name, r in kept.items()}
    alpha_pattern = {}
    if alpha_mode == "proportional":
        alpha_pattern = {
            re.escape(name): lora_alpha_for(r, base_rank=base.r, base_alpha=base.lora_alpha, mode=alpha_mode)
            for name, r in kept.items()
        }
    else:
        lora_alpha_for(1, base_rank=base.r, base_alpha=base.lora_alpha, mode=alpha_mode)  # validates the mode
    return replace(
        base,
        target_modules=list(kept),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=(alpha_mode == "rslora") or base.use_rslora,
        layers_to_transform=None,
        layers_pattern=None,
    )


def peft_ranks(peft_model) -> dict[str, int]:
    """The LoRA rank PEFT actually built on each module (name relative to the base model)."""
    out: dict[str, int] = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        r = getattr(module, "r", None)
        if isinstance(r, dict) and r:
            out[name[len(prefix) :] if name.startswith(prefix) else name] = int(next(iter(r.values())))
    return out


def peft_scalings(peft_model) -> dict[str, float]:
    """The LoRA scaling (alpha / r, or alpha / sqrt(r) for rsLoRA) of each module."""
    out: dict[str, float] = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        s = getattr(module, "scaling", None)
        if isinstance(s, dict) and s:
            out[name[len(prefix) :] if name.startswith(prefix) else name] = float(next(iter(s.values())))
    return out
