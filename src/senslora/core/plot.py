"""Figures drawn from an :class:`~senslora.core.pipeline.Allocation` (matplotlib, Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

LABELS = {
    "global": "trace (global)",
    "topk": "Top-k",
    "effective-rank": "Effective Rank",
    "fused": "fused (allocated)",
}


def matrix_kind(name: str, layer: int | None) -> str:
    """Short name of a matrix inside its block, e.g. ``attention.self.query`` or ``mlp.up_proj``."""
    if layer is None:
        return name
    marker = f".{layer}."
    return name.split(marker, 1)[1] if marker in name else name


def plot_ranks(allocation, path: str | Path) -> None:
    """The paper's Figure 3: per layer, the rank each single metric would allocate, and the fused one.

    Left: total rank per block under each score. Right: the allocated (fused) rank of every matrix,
    blocks on the x axis and matrix kinds on the y axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mats = allocation.matrices
    layers = sorted({m.layer for m in mats if m.layer is not None})
    kinds = list(dict.fromkeys(matrix_kind(m.name, m.layer) for m in mats))
    fig, (ax_line, ax_map) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.1, 1]})

    for score, label in LABELS.items():
        per_layer: dict[int, int] = defaultdict(int)
        for m in mats:
            if m.layer is not None:
                per_layer[m.layer] += m.ranks_by_score.get(score, m.rank if score == "fused" else 0)
        style = dict(lw=2.5, color="black") if score == "fused" else dict(lw=1.4, marker="o", ms=3)
        ax_line.plot(layers, [per_layer[layer] for layer in layers], label=label, **style)
    ax_line.set_xlabel("transformer block")
    ax_line.set_ylabel("total LoRA rank in block")
    ax_line.set_title(
        f"ranks per block under each metric ({allocation.strategy.upper()}, avg rank {allocation.avg_rank:g})"
    )
    ax_line.legend(fontsize=8)
    ax_line.grid(alpha=0.3)

    grid = np.full((len(kinds), max(len(layers), 1)), np.nan)
    for m in mats:
        if m.layer is not None:
            grid[kinds.index(matrix_kind(m.name, m.layer)), layers.index(m.layer)] = m.rank
    im = ax_map.imshow(grid, aspect="auto", cmap="viridis")
    ax_map.set_yticks(range(len(kinds)), kinds, fontsize=7)
    ax_map.set_xticks(range(len(layers)), layers, fontsize=7)
    ax_map.set_xlabel("transformer block")
    ax_map.set_title(f"allocated rank per matrix ({allocation.estimator} estimator)")
    fig.colorbar(im, ax=ax_map, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
