"""AdaLoRA (Zhang et al., 2023) through PEFT's ``AdaLoraConfig`` (METHOD.md section 7).

Budget: every target matrix starts at ``init_r = round(1.5 * avg_rank)`` SVD-style triplets
(P, Lambda, Q); PEFT's RankAllocator prunes the least important triplets on a cubic schedule
until ``target_r * n_matrices`` remain, i.e. the same total rank as uniform LoRA of rank
``target_r = avg_rank``. The trainable tensors stay at ``init_r`` (masked, not resized), so the
budget compared with uniform LoRA is the *final* one: ``target_r * sum(d_in + d_out + 1)`` (the
``+1`` is the singular value of each triplet), returned by :meth:`AdaLoRA.budget_parameter_count`.

Schedule (fractions of ``ctx.total_steps = T``): ``tinit = floor(0.1 T)`` warm-up steps at full
``init_r``, ``tfinal = max(1, floor(0.2 T))`` final steps at the fixed final pattern (0 when
``T = 1``), and a reallocation every ``deltaT = max(1, T // 100)`` steps in between (about 70
reallocations in the budget phase, whatever the run length).

Orthogonality regulariser: PEFT adds ``orth_reg_weight * mean ||P^T P - I||_F, ||Q Q^T - I||_F``
to ``outputs.loss`` inside the forward pass, and only when the model is given ``labels`` and
computes its own loss. Our training loop computes its own per-example loss without labels, so
the penalty is exposed as :meth:`AdaLoRA.extra_loss`, which the loop adds to the loss.

Resume: the RankAllocator's importance averages and the rank pattern are run state outside the
weights; :meth:`AdaLoRA.state_dict` / :meth:`AdaLoRA.load_state_dict` checkpoint them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...data.models import peft_task_type
from ._shared import method_targets, uniform_rank
from .base import Method, MethodContext, register, wrap_peft

ORTH_REG_WEIGHT = 0.5  # PEFT's and the paper's default


def adalora_schedule(total_steps: int) -> tuple[int, int, int]:
    """``(tinit, tfinal, deltaT)`` for a run of ``total_steps`` optimizer steps (see module doc)."""
    tinit = int(0.1 * total_steps)
    # At least one final step, so that the final allocation (at step T - tfinal) happens in the run.
    tfinal = max(1, int(0.2 * total_steps)) if total_steps >= 2 else 0
    delta_t = max(1, total_steps // 100)
    return tinit, tfinal, delta_t


@register
class AdaLoRA(Method):
    """PEFT AdaLoRA with ``init_r = 1.5 x avg_rank`` and ``target_r = avg_rank``."""

    name = "adalora"

    def __init__(self) -> None:
        super().__init__()
        self._budget_params = 0
        self._sizes: dict[str, int] = {}  # module name -> parameters per triplet (d_in + d_out + 1)
        self._model: nn.Module | None = None  # the PEFT model being trained (for state_dict)

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from peft import AdaLoraConfig

        targets = method_targets(model, ctx)
        target_r = uniform_rank(ctx, self.name)
        # Round half up (Python's round() would map 1.5 x 3 = 4.5 to 4).
        init_r = max(target_r + 1, int(1.5 * target_r + 0.5))
        tinit, tfinal, delta_t = adalora_schedule(ctx.total_steps)
        # The rank schedule, as recorded in result.json (PEFT calls delta_t "deltaT").
        schedule = {
            "init_r": init_r,
            "target_r": target_r,
            "tinit": tinit,
            "tfinal": tfinal,
            "delta_t": delta_t,
            "total_step": ctx.total_steps,
            "orth_reg_weight": ORTH_REG_WEIGHT,
        }
        config = AdaLoraConfig(
            **{"deltaT" if key == "delta_t" else key: value for key, value in schedule.items()},
            lora_alpha=ctx.lora_alpha,
            lora_dropout=ctx.lora_dropout,
            target_modules=[t.name for t in targets],
            task_type=peft_task_type(ctx.task_kind),
        )
        peft_model = wrap_peft(model, config)
        self._model = peft_model
        self._sizes = {t.name: t.lora_params_per_rank + 1 for t in targets}
        self._budget_params = target_r * sum(self._sizes.values())
        self.record.update(
            schedule,
            target_rank_budget=target_r * len(targets),
            target_budget_params=self._budget_params,
        )
        return peft_model

    def load(self, base_model: nn.Module, adapter_dir: Path, ctx: MethodContext) -> nn.Module:
        with warnings.catch_warnings():
            # PEFT first reads AdaLoRA's saved rank_pattern (parameter-name keys) as LoRA patterns,
            # warns that they match nothing, then resizes the layers by it correctly.
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            return super().load(base_model, adapter_dir, ctx)

    def budget_parameter_count(self, model: nn.Module) -> int:
        """The final budget compared with uniform LoRA: ``target_r * sum(d_in + d_out + 1)``."""
        return self._budget_params

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Update importance scores and prune triplets (needs the gradients: before zero_grad)."""
        model.base_model.update_and_allocate(step)
        self._record_pattern(model, step)

    def _record_pattern(self, model: nn.Module, step: int) -> None:
        pattern = model.peft_config[model.base_model.trainable_adapter_name].rank_pattern
        if pattern is None:
            return
        # Keys are parameter names "<module>.lora_E[.<adapter>]"; keep the module name.
        ranks = {key.split(".lora_E")[0]: int(sum(kept)) for key, kept in pattern.items()}
        if ranks == self.record.get("rank_pattern"):
            return
        self.record.update(
            rank_pattern=ranks,
            rank_pattern_step=step,
            effective_rank_budget=sum(ranks.values()),
            effective_params=sum(r * self._sizes.get(name, 0) for name, r in ranks.items()),
        )

    def state_dict(self) -> dict[str, Any]:
        """The RankAllocator's importance averages and the rank pattern, to checkpoint for a resume."""
        allocator = self._model.base_model.rankallocator
        config = self._model.peft_config[allocator.adapter_name]
        return {
            "ipt": {n: t.clone() for n, t in allocator.ipt.items()},
            "exp_avg_ipt": {n: t.clone() for n, t in allocator.exp_avg_ipt.items()},
            "exp_avg_unc": {n: t.clone() for n, t in allocator.exp_avg_unc.items()},
            "rank_pattern": config.rank_pattern,
            "rank_pattern_step": self.record.get("rank_pattern_step"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after :meth:`prepare` (and after loading the trained weights)."""
        allocator = self._model.base_model.rankallocator
        allocator.ipt = dict(state["ipt"])
        allocator.exp_avg_ipt = dict(state["exp_avg_ipt"])
        allocator.exp_avg_unc = dict(state["exp_avg_unc"])
        self._model.peft_config[allocator.adapter_name].rank_pattern = state["rank_pattern"]
        if state["rank_pattern_step"] is not None:
            self._record_pattern(self._model, state["rank_pattern_step"])

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """AdaLoRA's orthogonality penalty on the trainable P (lora_B) and Q (lora_A) factors."""
        penalties = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if ".lora_A." in name:
                gram = p @ p.T  # Q: (r, d_in), rows should be orthonormal
            elif ".lora_B." in name:
                gram = p.T @ p  # P: (d_out, r), columns should be orthonormal
            else:
                continue
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            penalties.append(torch.linalg.matrix_norm(gram - eye))  # Frobenius norm
        if not penalties:
            return None
        return ORTH_REG_WEIGHT * torch.stack(penalties).mean()
