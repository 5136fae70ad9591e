"""EVA (Paischer et al., 2024, "explained variance adaptation") through PEFT.

PEFT's ``LoraConfig(init_lora_weights="eva")``: the LoRA ``A`` of each target is initialised with
the top right-singular vectors of that layer's inputs on the calibration batches (incremental
PCA), and ranks are redistributed across matrices by explained variance ratio, each matrix
getting at most ``rho * r`` (``rho = 2`` by default). The total rank stays
``r * n_matrices`` of uniform LoRA at ``r = avg_rank``; matrices of different shapes cost
different parameters per rank, so the parameter count moves with the redistribution (recorded).

Tokens entering the SVD: non-padding ones (attention mask); in causal-LM batches only those with
a label other than -100 (e.g. the answer, not the prompt, of chat-qa: PEFT's ``use_label_mask``).
Only the model inputs are passed to the forward pass, so labels never reach the model.
Option ``ctx.options["eva_rho"]`` overrides ``rho``.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch.nn as nn

from ...core.errors import SensloraError
from ...core.inits import run_eva
from ...core.peft_bridge import peft_ranks
from ._shared import method_targets
from .base import Method, MethodContext, register, wrap_peft
from .lora import uniform_lora_config

DEFAULT_RHO = 2.0


@register
class EVA(Method):
    """PEFT LoRA with EVA initialisation and rank redistribution."""

    name = "eva"
    option_keys = ("eva_rho",)

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from peft import EvaConfig

        if not ctx.calibration_batches:
            raise SensloraError("eva needs calibration batches from the training split")
        rho = float(ctx.options.get("eva_rho", DEFAULT_RHO))
        # Uniform LoRA's config (same r, alpha, targets, task type), initialised by EVA.
        config = replace(
            uniform_lora_config(model, ctx, self.name), init_lora_weights="eva", eva_config=EvaConfig(rho=rho)
        )
        names = [t.name for t in method_targets(model, ctx)]  # module order, for the record
        # low_cpu_mem_usage: LoRA weights stay on the meta device until EVA fills them.
        peft_model = wrap_peft(model, config, low_cpu_mem_usage=True)
        start = time.perf_counter()
        passes: dict = {}
        run_eva(peft_model, ctx.calibration_batches, passes)
        seconds = time.perf_counter() - start
        built = peft_ranks(peft_model)
        ranks = {name: built.get(name, 0) for name in names}  # rank 0: EVA removed that LoRA
        self.record.update(
            rho=rho,
            eva_ranks=ranks,
            eva_rank_budget=config.r * len(names),
            eva_total_rank=sum(ranks.values()),
            eva_seconds=seconds,
            eva_forward_passes=passes["eva_forward_passes"],
        )
        return peft_model
