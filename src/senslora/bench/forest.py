"""The headline's forest plot (``plots/headline-forest.png``): per task, one row per setting with its
paired difference against the baseline (mean and 95% t-interval over seeds), a line at zero, and
per model the pooled row of its classification / regression tasks. Pure drawing and pooling: the rows are
built by :mod:`senslora.bench.report` from the same paired differences its headline table holds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .stats import paired_interval

FOREST_PNG = "headline-forest.png"


def pooled_label(model: str) -> str:
    """The label of one model's pooled group, e.g. "tasks pooled (minilm)"."""
    return f"tasks pooled ({model})"


@dataclass
class ForestRow:
    """One setting's paired differences (setting - baseline, one per seed; pooled rows one per
    task and seed) and their mean and 95% t-interval (nan bounds with fewer than 2 pairs)."""

    setting: str
    diffs: list[float]
    mean: float = field(init=False)
    lo: float = field(init=False)
    hi: float = field(init=False)

    def __post_init__(self) -> None:
        self.mean, self.lo, self.hi = paired_interval(self.diffs)

    @property
    def verdict(self) -> str:
        """"win" / "loss" where the interval excludes zero, "tie" otherwise, "" without an interval."""
        if math.isnan(self.lo):
            return ""
        return "win" if self.lo > 0 else ("loss" if self.hi < 0 else "tie")


@dataclass
class ForestGroup:
    """The rows of one task (``label`` e.g. "movie-polarity", ``metric`` its primary metric) or a
    pooled group (``label`` :func:`pooled_label`, ``metric`` the pooled tasks' metrics)."""

    label: str
    metric: str
    rows: list[ForestRow]
    pooled_from: list[str] = field(default_factory=list)  # a pooled group: the tasks' labels

    @property
    def pooled(self) -> bool:
        return bool(self.pooled_from)


def pooled_rows(groups: list[ForestGroup]) -> list[ForestRow]:
    """Per setting, the raw per-(task, seed) differences of every group pooled into one sample (no
    scaling by task), for the settings that have differences in 2+ of the groups; in first-seen order."""
    pooled: dict[str, list[float]] = {}
    tasks: dict[str, int] = {}
    for group in groups:
        for row in group.rows:
            pooled.setdefault(row.setting, []).extend(row.diffs)
            tasks[row.setting] = tasks.get(row.setting, 0) + 1
    return [ForestRow(s, d) for s, d in pooled.items() if tasks[s] >= 2]


def x_range(group: ForestGroup, pad: float = 0.06) -> tuple[float, float]:
    """The x limits of one group's panel: every mean and finite interval bound of its rows and zero,
    padded by ``pad`` of the span. Each panel gets its own, since the groups' metrics differ in scale
    (a ROUGE-L difference over 5 seeds can span ten times an accuracy difference over 8)."""
    values = [0.0, *(v for r in group.rows for v in (r.mean, r.lo, r.hi) if math.isfinite(v))]
    lo, hi = min(values), max(values)
    margin = pad * (hi - lo) if hi > lo else 0.01
    return lo - margin, hi + margin


def forest_plot(groups: list[ForestGroup], path: Path, *, baseline: str) -> None:
    """One panel per group (stacked, each with its own x range: :func:`x_range`), one row per
    setting: the mean difference against ``baseline`` with its 95% interval, green where it
    excludes zero above it, red below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [len(g.rows) + 1.2 for g in groups]
    fig, axes = plt.subplots(
        len(groups), 1, squeeze=False,
        figsize=(7.5, 0.9 + 0.2 * sum(heights)), gridspec_kw={"height_ratios": heights},
    )
    colours = {"win": "tab:green", "loss": "tab:red"}
    for ax, group in zip(axes[:, 0], groups, strict=True):
        ys = list(range(len(group.rows)))[::-1]
        for y, row in zip(ys, group.rows, strict=True):
            colour = colours.get(row.verdict, "0.25")
            if not math.isnan(row.lo):
                ax.plot([row.lo, row.hi], [y, y], color=colour, linewidth=1.6)
            ax.plot([row.mean], [y], marker="D" if group.pooled else "o", color=colour, markersize=4.5)
        ax.axvline(0, color="0.4", linewidth=0.8, linestyle="--")
        ax.set_yticks(ys, [f"{r.setting} ({len(r.diffs)})" for r in group.rows], fontsize=7.5)
        for label, row in zip(ax.get_yticklabels(), group.rows, strict=True):
            if row.setting.split(",")[0] == "senslora":
                label.set_fontweight("bold")
        ax.set_ylim(-0.7, len(group.rows) - 0.3)
        ax.set_xlim(*x_range(group))
        what = f"{', '.join(group.pooled_from)} (raw differences)" if group.pooled_from else group.metric
        ax.set_title(f"{group.label}: {what}", fontsize=8.5, loc="left")
        ax.tick_params(axis="x", labelsize=7.5)
        ax.grid(axis="x", color="0.9", linewidth=0.6)
    axes[-1, 0].set_xlabel(f"paired difference against {baseline}: mean and 95% t-interval over seeds (number of pairs)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
