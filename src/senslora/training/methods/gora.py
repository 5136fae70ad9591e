"""GoRA (He et al., 2025, arXiv 2502.12171, "Gradient-driven Adaptive Low Rank Adaptation"): our
implementation from the paper; no maintained library has it.

Before training, on the calibration batches (the training split's, as for every data-driven
method):

1. The mean task-loss gradient ``G`` of every target weight (one forward and backward per batch,
   eval mode; a full fp32 gradient copy of the targets on the CPU, GoRA's own cost).
2. Importance ``I_w = mean |W * G|`` (the paper's; its public code's default is the Frobenius
   norm of ``W * G``, which we do not use).
3. Ranks: each matrix gets trainable parameters in proportion to ``I_w`` out of uniform LoRA's
   parameter count at ``avg_rank``, i.e. ``r_w ~ I_w / sum I * budget / (d_in + d_out)``, within
   ``[max(1, r/2), 4 r]`` (the paper's bounds 4..32 around r = 8). Where the paper rounds and
   clamps (missing the budget by a few percent), we hold the budget with the same
   largest-remainder rule as ``senslora --budget params`` (:func:`allocate_params`), so GoRA meets
   the 5% rule like every other method.
4. Init: ``A`` random (PEFT's Kaiming-uniform scale, seeded per matrix: :func:`draw_a`),
   ``B = -(gamma / alpha) G A^T (A A^T)^{-1}`` with the LoRA scaling ``alpha / r`` of the
   reference rank for every matrix (GoRA's non-dynamic scaling: per-matrix alpha is proportional
   to the rank), so the first update is ``-(gamma / r) P_A(G)``, a compressed gradient step;
   ``W`` is unchanged. ``gamma`` is ``--option gora_gamma=`` (default 0.02, the public code's
   ``--gora-stable-gemma``).
"""

from __future__ import annotations

import time

import numpy as np
import torch.nn as nn

from ...core.allocation import allocate_params
from ...core.errors import SensloraError
from ...core.estimators.base import _as_linear
from ...core.inits import mean_gradients, set_factors
from ...core.peft_bridge import peft_scalings, ranks_to_lora_config
from ...core.sketch import draw_a, least_squares_b
from ._shared import method_targets, uniform_rank
from .base import Method, MethodContext, register, wrap_peft
from .lora import uniform_lora_config

DEFAULT_GAMMA = 0.02


def gora_ranks(importance: np.ndarray, costs: np.ndarray, shapes: list[tuple[int, int]], rank: int) -> np.ndarray:
    """Integer ranks in proportion to ``importance`` under uniform LoRA's parameter budget, within
    ``[max(1, rank // 2), 4 rank]`` (and each matrix's smaller side)."""
    r_max = np.minimum(np.array([min(s) for s in shapes], dtype=np.int64), 4 * rank)
    return allocate_params(importance, int(rank * costs.sum()), costs, r_min=max(1, rank // 2), r_max=r_max)


@register
class GoRA(Method):
    """GoRA: gradient-importance ranks and a gradient-compressing init, then plain PEFT LoRA."""

    name = "gora"
    option_keys = ("gora_gamma",)

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        if not ctx.calibration_batches:
            raise SensloraError("gora needs calibration batches from the training split")
        gamma = float(ctx.options.get("gora_gamma", DEFAULT_GAMMA))
        rank = uniform_rank(ctx, self.name)
        targets = method_targets(model, ctx)
        start = time.perf_counter()
        grads = mean_gradients(model, targets, ctx.calibration_batches, device=ctx.device)
        importance = np.array(
            [float((_as_linear(t, t.module.weight).detach().float().cpu() * grads[t.name]).abs().mean()) for t in targets]
        )
        costs = np.array([t.lora_params_per_rank for t in targets], dtype=np.int64)
        ranks = gora_ranks(importance, costs, [t.shape for t in targets], rank)
        base = uniform_lora_config(model, ctx, self.name)
        config = ranks_to_lora_config({t.name: int(r) for t, r in zip(targets, ranks, strict=True)}, base)
        peft_model = wrap_peft(model, config)
        scalings = peft_scalings(peft_model)
        factors = {}
        for t, r in zip(targets, ranks, strict=True):
            a = draw_a(t.name, int(r), t.shape[1], ctx.seed)
            factors[t.name] = (a, least_squares_b(grads[t.name] @ a.T, a) * (-gamma / (scalings[t.name] * rank)))
        set_factors(peft_model, factors)
        self.record.update(
            gora_gamma=gamma,
            gora_seconds=time.perf_counter() - start,
            gora_ranks={t.name: int(r) for t, r in zip(targets, ranks, strict=True)},
            gora_importance={t.name: float(i) for t, i in zip(targets, importance, strict=True)},
            allocated_params=int(ranks @ costs),
            uniform_params=int(rank * costs.sum()),
        )
        return peft_model
