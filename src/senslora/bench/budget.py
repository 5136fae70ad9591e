"""The budget curve in a benchmark report: quality against trainable adapter parameters per setting
(one PNG per experiment, i.e. per task), and whether a setting at half the baseline's average rank
is non-inferior to the baseline at the full rank (issue 27: margin 0.5 point, one-sided 95%).

An experiment is a budget curve when its grid varies ``avg_rank`` over two or more values and names
a ``baseline`` setting. Pairs are formed by seed and the other grid values, as in the paired
tables; the statistics are :func:`senslora.bench.stats.one_sided_lower`.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..data.guard import path_component
from .stats import one_sided_lower, paired_interval
from .tables import _matches, _row_key, _setting_name, _short_label, _table

RANK = "avg_rank"
MARGIN_POINTS = 0.5  # the non-inferiority margin, in points of the primary metric
PERCENT_METRICS = frozenset({"bleu", "mean(bleu,rouge1,rougeL)"})  # already in points (0-100)


def margin_for(metric: str) -> float:
    """0.5 point on the metric's own scale: 0.5 for a metric in percent, 0.005 for one in [0, 1]."""
    return MARGIN_POINTS if metric in PERCENT_METRICS else MARGIN_POINTS / 100


def is_budget_curve(ok: list[dict]) -> bool:
    grids = [r["_meta"]["grid"] for r in ok]
    return bool(ok) and bool(ok[0]["_meta"].get("baseline")) and len({g.get(RANK) for g in grids if RANK in g}) >= 2


def curve_points(ok: list[dict], metric: str) -> dict[tuple, list[tuple[float, list[float]]]]:
    """Setting (grid point without seed and rank) -> [(mean trainable params, per-seed metric)] by rank."""
    by: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        if isinstance(r["metrics"].get(metric), (int, float)):
            by[_row_key(r, ("seed", RANK))][r["_meta"]["grid"][RANK]].append(r)
    return {
        key: [
            (statistics.fmean(m["trainable_params"] for m in runs), [m["metrics"][metric] for m in runs])
            for _, runs in sorted(ranks.items())
        ]
        for key, ranks in by.items()
    }


def half_budget_pairs(ok: list[dict], baseline: dict, metric: str) -> dict[tuple[tuple, int], list[float]]:
    """(setting, baseline rank r) -> per-seed differences: the setting at rank r/2 minus the
    baseline at rank r, same seed and other grid values. The baseline is a setting too: its own
    row (half its budget against its full budget) is the control that says whether halving the
    budget costs anything on the task at all."""
    drop = ("seed", RANK, *baseline)
    base = {
        (_row_key(r, drop), r["seed"], r["_meta"]["grid"][RANK]): r["metrics"].get(metric)
        for r in ok
        if _matches(r, baseline)
    }
    diffs: dict[tuple[tuple, int], list[float]] = defaultdict(list)
    for r in ok:
        rank = r["_meta"]["grid"][RANK]
        if not isinstance(rank, int):
            continue
        b = base.get((_row_key(r, drop), r["seed"], 2 * rank))
        if b is not None and r["metrics"].get(metric) is not None:
            diffs[(_row_key(r, ("seed", RANK)), 2 * rank)].append(r["metrics"][metric] - b)
    return diffs


def budget_section(name: str, ok: list[dict], plots: Path) -> list[str]:
    """The curve's PNG and the non-inferiority table of one budget experiment ([] when it is not one)."""
    if not is_budget_curve(ok):
        return []
    baseline = ok[0]["_meta"]["baseline"]
    metric = ok[0]["primary_metric"]
    margin = margin_for(metric)
    plot = path_component(f"{name}-budget", "plot", escape=True)
    budget_plot(name, curve_points(ok, metric), metric, plots / f"{plot}.png")
    base_label = _setting_name(baseline)
    controls = {_row_key(r, ("seed", RANK)) for r in ok if _matches(r, baseline)}
    rows = []
    shown: dict[tuple, list[str]] = defaultdict(list)  # setting -> the budgets it is non-inferior at
    tested: dict[tuple, int] = defaultdict(int)
    for (key, rank), d in sorted(half_budget_pairs(ok, baseline, metric).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = statistics.fmean(d)
        lower = one_sided_lower(d)
        verdict = "–" if math.isnan(lower) else ("**non-inferior**" if lower > -margin else "not shown")
        tested[key] += not math.isnan(lower)
        if verdict.startswith("**"):
            shown[key].append(f"{rank // 2} vs {rank}")
        label = _short_label(key) + (" (control: the baseline itself)" if key in controls else "")
        rows.append(
            [label, f"{rank // 2} vs {rank}", str(len(d)), f"{m:+.4f}", "–" if math.isnan(lower) else f"{lower:+.4f}", verdict]
        )
    summary = [
        f"{_short_label(key)}{' (the control)' if key in controls else ''}: non-inferior at {len(shown[key])} of {n} "
        f"budgets{' (rank ' + ', '.join(shown[key]) + ')' if shown[key] else ''}"
        for key, n in sorted(tested.items(), key=lambda kv: kv[0] in controls)
        if n
    ]
    lines = [f"Budget curve of `{name}`: {metric} against trainable adapter parameters, mean with its 95% "
             "t-interval over seeds, per setting (each at the rate its grid names; the table above has the "
             "full settings; the settings' points are nudged slightly apart along the axis).", "", f"![{plot}](plots/{plot}.png)", ""]
    if rows:
        lines += [
            f"Half the budget against {base_label} at the full budget (same seed): the difference in {metric}, "
            f"its one-sided 95% lower bound, and **non-inferior** when that bound is above -{margin:g} "
            f"(a {MARGIN_POINTS:g}-point margin).",
            "",
        ]
        lines += _table(["setting", "rank (setting vs baseline)", "pairs", "mean diff", "lower 95%", "verdict"], rows)
        lines += [
            "",
            "The control row is the baseline at half its budget against itself at the full budget: where it "
            "is non-inferior too, halving the budget costs the baseline nothing measurable on this task, so a "
            "setting's non-inferiority there says nothing about how it spends its parameters.",
            "",
        ]
        if summary:
            lines += [f"On `{name}`, each setting at half the baseline's rank against the baseline at the full rank: "
                      + "; ".join(summary) + ".", ""]
    return lines


def budget_plot(name: str, points: dict[tuple, list[tuple[float, list[float]]]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (key, series) in enumerate(points.items()):
        nudge = 2 ** (0.04 * (i - (len(points) - 1) / 2))  # side by side, so the intervals stay apart
        xs, ms, hw = [], [], []
        for params, values in series:
            m, lo, hi = paired_interval(values)  # the t-interval of the mean over seeds
            xs.append(params * nudge)
            ms.append(m)
            hw.append(0.0 if math.isnan(lo) else (hi - lo) / 2)
        ax.errorbar(xs, ms, yerr=hw, marker="o", capsize=3, label=_short_label(key))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("trainable adapter parameters")
    ax.set_ylabel(metric)
    ax.set_title(f"{name}: {metric} by budget (mean, 95% interval)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
