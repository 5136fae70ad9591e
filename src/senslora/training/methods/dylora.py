"""DyLoRA (Valipour et al., 2023): nested dropout on the LoRA rank (METHOD.md section 7).

DyLoRA is not in any maintained library (PEFT does not have it), so it is built here on top of
PEFT's LoRA layers: uniform LoRA of rank ``r_max = avg_rank`` on the same targets as ``lora``,
hence exactly the same trainable parameters. Before each optimizer step a rank ``b ~ U{1..r_max}``
is drawn, and a forward hook on every ``lora_A`` multiplies its output by
``[r/b] * b + [0] * (r - b)``: only the first ``b`` components are used (the others get zero
gradient), with the paper's scaling ``alpha / b`` in place of PEFT's ``alpha / r``.
Evaluation and the saved adapter use the full rank ``r_max``: the saved folder is plain PEFT LoRA,
reloaded by the default :meth:`Method.load`.

Sampling is deterministic: one ``torch.Generator`` seeded with ``ctx.seed``, drawn once per
optimizer step; :meth:`DyLoRA.state_dict` / :meth:`DyLoRA.load_state_dict` save and restore it
so a resumed run draws the same ranks as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .base import Method, MethodContext, register, wrap_peft
from .lora import uniform_lora_config


@register
class DyLoRA(Method):
    """PEFT LoRA of rank ``avg_rank`` trained with a random rank ``b`` per step."""

    name = "dylora"

    def __init__(self) -> None:
        super().__init__()
        self.r_max = 0
        self._generator = torch.Generator()
        self._step: int | None = None  # optimizer step of the last draw
        self._rank: int | None = None  # rank drawn for that step
        self._mask: torch.Tensor | None = None  # None = full rank (evaluation, or b = r_max)

    @property
    def rank_in_use(self) -> int:
        """The number of rank components the next forward pass uses."""
        return self.r_max if self._mask is None else self._rank

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from peft.tuners.lora import LoraLayer

        config = uniform_lora_config(model, ctx, self.name)
        self.r_max = config.r
        peft_model = wrap_peft(model, config)
        self._generator.manual_seed(ctx.seed)
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.lora_A["default"].register_forward_hook(self._mask_output)
        self.record.update(r_max=self.r_max, rank_sampling="uniform 1..r_max per step", scaling="alpha / b")
        return peft_model

    def _mask_output(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        # Forward hook on lora_A: keep the first b rank components, rescaled by r / b.
        if self._mask is None:
            return None
        return output * self._mask.to(device=output.device, dtype=output.dtype)

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        """Draw ``b ~ U{1..r_max}`` once per optimizer step (micro-batches of a step share it)."""
        if step != self._step:
            self._step = step
            self._rank = int(torch.randint(1, self.r_max + 1, (1,), generator=self._generator))
        # Keep the first b components at scale r / b; b = r_max needs no mask.
        if self._rank == self.r_max:
            self._mask = None
        else:
            self._mask = torch.zeros(self.r_max)
            self._mask[: self._rank] = self.r_max / self._rank

    def on_eval(self, model: nn.Module) -> None:
        """Evaluate at the full rank ``r_max`` (until the next :meth:`on_step_begin`)."""
        self._mask = None

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state, to checkpoint with the run."""
        return {
            "generator": self._generator.get_state(),
            "step": self._step,
            "rank": self._rank,
            "r_max": self.r_max,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`prepare`)."""
        self._generator.set_state(state["generator"])
        self.r_max = int(state["r_max"])
        self._step = state["step"]
        self._rank = state["rank"]
        self._mask = None  # the next on_step_begin rebuilds it
