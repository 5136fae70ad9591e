"""LoRA with a uniform rank (``lora``) and with sensitivity-allocated ranks (``senslora``).

Both put LoRA on the same target matrices (:func:`senslora.core.targets.find_targets`: every linear
layer inside the transformer blocks unless ``--targets`` / ``--layers`` say otherwise), with
PEFT's ``task_type`` (SEQ_CLS also trains the classification head through ``modules_to_save``).
``senslora`` spends the same budget, by default the same trainable parameter count as uniform
LoRA (``budget_mode="params"``; the paper's rank budget ``avg_rank x number of matrices`` with
``--budget rank``), spread by the allocator (METHOD.md sections 1-5);
training then is plain PEFT LoRA, so its per-step cost is LoRA's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ...core.presets import RECIPE_KEYS, preset_init
from ...data.models import peft_task_type
from ._shared import method_targets, uniform_rank
from .base import Method, MethodContext, initialise, register, wrap_peft

# Options passed from ``ctx.options`` to :func:`senslora.core.pipeline.allocate` when set.
ALLOCATOR_OPTIONS = (
    "preset",
    *RECIPE_KEYS,
    "categories",
    "r_min",
    "r_max",
    "budget_mode",
    "alpha_mode",
    "num_probes",
    "accumulate_on",
    "init",
    "init_step",
)
ALLOCATION_DIR = "allocation"
TRAIN_BUDGET_MODE = "params"


def uniform_lora_config(model: nn.Module, ctx: MethodContext, method: str):
    """``LoraConfig`` of uniform LoRA of rank ``round(avg_rank)`` on the method's target matrices."""
    from peft import LoraConfig

    return LoraConfig(
        r=uniform_rank(ctx, method),
        lora_alpha=ctx.lora_alpha,
        lora_dropout=ctx.lora_dropout,
        target_modules=[t.name for t in method_targets(model, ctx)],
        task_type=peft_task_type(ctx.task_kind),
    )


@register
class LoRA(Method):
    """PEFT LoRA, the same rank on every target matrix; ``init`` (option) initialises it
    (:mod:`senslora.core.inits`; ``zero`` is PEFT's default)."""

    name = "lora"
    reads_init = True

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        config = uniform_lora_config(model, ctx, self.name)
        init = self.init_for(ctx.options)
        self.record.update(
            rank=config.r, lora_alpha=config.lora_alpha, target_matrices=len(config.target_modules), init=init
        )
        if init == "zero":
            return wrap_peft(model, config)
        step = ctx.options.get("init_step")
        return initialise(self, model, config, init, ctx, **({"step": step} if step is not None else {}))


@register
class SensLoRA(Method):
    """PEFT LoRA with per-matrix ranks from :func:`senslora.core.pipeline.allocate` (the paper's method).

    Options (``ctx.options``): the allocator's (:data:`ALLOCATOR_OPTIONS`), ``target_modules`` and
    ``layers`` (as for ``lora``), ``plot`` (write ``ranks.png``, default True), ``progress`` and
    ``model`` (name recorded in ``allocation.json``). The allocation is saved into
    ``ctx.out_dir / "allocation"``; when that folder already exists (a resumed run) it is reused
    instead of allocating again.
    """

    name = "senslora"
    reads_init = True

    def init_for(self, options: Mapping[str, Any]) -> str | None:
        """The ``init`` option, else the ``preset``'s (core/presets.py ``PRESET_INITS``)."""
        return options.get("init") or preset_init(options.get("preset"))

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from ...core.distributed import current
        from ...core.pipeline import Allocation, allocate

        base = uniform_lora_config(model, ctx, self.name)
        folder = ctx.out_dir / ALLOCATION_DIR if ctx.out_dir is not None else None
        reused = folder is not None and (folder / "allocation.json").is_file()
        if reused:
            alloc = Allocation.load(folder)
        else:
            options: dict[str, Any] = {
                k: ctx.options[k] for k in ALLOCATOR_OPTIONS if ctx.options.get(k) is not None
            }
            # Training compares methods at equal trainable parameters (issue 3's 10% rule): the
            # paper's rank budget gives wide matrices (e.g. 384 -> 1536) most of the ranks and
            # ~30% more parameters than uniform LoRA on MiniLM. budget_mode="rank" restores it.
            options.setdefault("budget_mode", TRAIN_BUDGET_MODE)
            alloc = allocate(
                model,
                ctx.calibration_batches,
                avg_rank=ctx.avg_rank,
                target_modules=ctx.options.get("target_modules"),
                layers=ctx.options.get("layers"),
                lora_alpha=ctx.lora_alpha,
                seed=ctx.seed,
                device=ctx.device,
                progress=bool(ctx.options.get("progress", False)),
                model_name=str(ctx.options.get("model", "")),
                **options,
            )
            if folder is not None:
                # With several processes the main one writes, the others wait.
                alloc.save(folder, plot=bool(ctx.options.get("plot", True)), base_config=base)
                current().barrier()
        ranks = alloc.ranks
        self.record.update(
            allocation_time_s=alloc.timings.get("total", 0.0),
            allocation_forward_s=alloc.timings.get("forward"),
            allocation_reused=reused,
            recipe=alloc.recipe,
            estimator=alloc.estimator,
            score=alloc.score,
            fusion=alloc.fusion,
            strategy=alloc.strategy,
            budget_mode=alloc.budget_mode,
            total_rank=alloc.total_rank,
            rank_min=min(ranks.values()),
            rank_max=max(ranks.values()),
            concentration=alloc.concentration,
            allocated_params=alloc.trainable_params,
            uniform_params=alloc.uniform_params,
            ranks=ranks,
            init=alloc.init,
        )
        if alloc.init == "zero":  # exactly as before inits existed: PEFT's default
            return wrap_peft(model, alloc.to_lora_config(base))
        return initialise(
            self, model, alloc.to_lora_config(base), alloc.init, ctx, sketch=alloc.sketch, step=alloc.init_step
        )
