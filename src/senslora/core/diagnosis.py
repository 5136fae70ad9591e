"""Where the sensitivity mass sits: per-matrix concentration of S_global over tokens and channels.

The activation estimator's S_global of a matrix is ``d_out * 2 * mean_t sum_j x_tj^2``: a sum over
calibration tokens ``t`` and input channels ``j``. :func:`diagnose_activation` splits it both ways
and reports, per target matrix, the share that comes from the top 1% of tokens (by their energy
``sum_j x_tj^2``) and from the top 1% of input channels (by ``sum_t x_tj^2``), which positions and
token ids the top tokens are, and which channels lead. :func:`diagnose_diagonals` does the channel
split on any estimator's diagonal (``fisher``: columns of the per-example squared gradients).

This is a report, not part of the allocation: ``senslora diagnose`` writes it to diagnosis.json.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from .diagonal import Diagonal
from .losses import input_device, model_inputs, move_batch
from .targets import Target


def top_share(values: np.ndarray, fraction: float = 0.01) -> float:
    """Share of ``sum(values)`` held by the largest ``ceil(fraction * n)`` values (0 if the sum is 0)."""
    v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))[::-1]
    total = float(v.sum())
    if v.size == 0 or total <= 0:
        return 0.0
    k = max(1, math.ceil(fraction * v.size))
    return float(v[:k].sum() / total)


def _channel_report(col: np.ndarray, fraction: float) -> dict:
    order = np.argsort(-col, kind="stable")
    total = float(col.sum()) or 1.0
    return {
        "top_channel_share": top_share(col, fraction),
        "top_channels": [[int(j), float(col[j] / total)] for j in order[:3]],
    }


def diagnose_diagonals(diagonals: dict[str, Diagonal], fraction: float = 0.01) -> dict[str, dict]:
    """Per matrix: share of the trace in the top ``fraction`` of input channels (column sums of
    the diagonal) and of output rows, and the three leading channels."""
    out = {}
    for name, d in diagonals.items():
        v = d.values.detach().double().cpu()
        if d.compact:
            col, rows = v.numpy() * d.shape[0], None
        else:
            col, rows = v.sum(0).numpy(), v.sum(1).numpy()
        report = _channel_report(col, fraction)
        if rows is not None:
            report["top_row_share"] = top_share(rows, fraction)
        out[name] = report
    return out


@torch.no_grad()
def diagnose_activation(
    model: nn.Module,
    batches: Sequence[dict],
    targets: list[Target],
    *,
    tokenizer=None,
    fraction: float = 0.01,
    device=None,
) -> dict:
    """Split every target's activation trace over tokens and channels (one forward per batch).

    Returns ``{"matrices": {name: {...}}, "tokens": {...}}``: per matrix the top-token and
    top-channel shares, the share at position 0, and the leading channels; overall, for the top
    ``fraction`` of tokens of the matrices that hold the most S_global, the share of them at
    position 0 and their most common token strings.
    """
    device = device or input_device(model)
    energy: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    columns: dict[str, torch.Tensor] = {}
    state: dict = {}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().float()
            if x.dim() != 3:
                x = x.reshape(x.shape[0], 1, -1)
            sq = x.square()
            m = state["mask"].to(sq.device).unsqueeze(-1)
            sq = sq * m
            energy[name].append(sq.sum(-1).reshape(-1)[state["keep"]].cpu())
            col = sq.sum((0, 1)).cpu()
            columns[name] = columns[name] + col if name in columns else col

        return fn

    positions, token_ids = [], []
    handles = [t.module.register_forward_hook(hook(t.name)) for t in targets]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            ids = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
            state["mask"] = mask.float()
            state["keep"] = mask.reshape(-1).cpu()
            # Position of each real token within its own sequence (left or right padding alike).
            pos = (mask.long().cumsum(1) - 1).reshape(-1).cpu()[state["keep"]]
            positions.append(pos)
            token_ids.append(ids.reshape(-1).cpu()[state["keep"]])
            model(**model_inputs(batch))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    pos = torch.cat(positions).numpy()
    ids = torch.cat(token_ids).numpy()
    matrices, mass = {}, {}
    for t in targets:
        e = torch.cat(energy[t.name]).double().numpy()
        total = float(e.sum()) or 1.0
        k = max(1, math.ceil(fraction * e.size))
        top = np.argsort(-e, kind="stable")[:k]
        report = {
            "top_token_share": float(e[top].sum() / total),
            "position0_share": float(e[pos == 0].sum() / total),
            "top_tokens_at_position0": float(np.mean(pos[top] == 0)),
        }
        report.update(_channel_report(columns[t.name].double().numpy(), fraction))
        matrices[t.name] = report
        mass[t.name] = total * t.shape[0]  # proportional to S_global
    # Which tokens: the top tokens of the matrices holding most of the total S_global.
    lead = sorted(mass, key=mass.get, reverse=True)[: max(1, math.ceil(0.05 * len(mass)))]
    counter: Counter = Counter()
    at0 = []
    for name in lead:
        e = torch.cat(energy[name]).numpy()
        top = np.argsort(-e, kind="stable")[: max(1, math.ceil(fraction * e.size))]
        at0.extend((pos[top] == 0).tolist())
        counter.update(int(i) for i in ids[top])
    decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else str
    total_mass = sum(mass.values()) or 1.0
    summary = {
        "lead_matrices": lead,
        "lead_share_of_s_global": float(sum(mass[n] for n in lead) / total_mass),
        "lead_top_tokens_at_position0": float(np.mean(at0)),
        "lead_top_token_strings": [[decode(i), c] for i, c in counter.most_common(8)],
        "tokens": int(pos.size),
    }
    return {"matrices": matrices, "summary": summary}


def summarize(matrices: dict[str, dict], key: str) -> dict[str, float]:
    """Median, 90th percentile and maximum of one per-matrix figure."""
    v = np.array([m[key] for m in matrices.values() if key in m], dtype=np.float64)
    if v.size == 0:
        return {}
    return {"median": float(np.median(v)), "p90": float(np.quantile(v, 0.9)), "max": float(v.max())}
