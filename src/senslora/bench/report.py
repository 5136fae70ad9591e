"""Tables and plots built only from a benchmark's result files (``senslora report DIR``).

Writes ``DIR/RESULTS.md`` and ``DIR/plots/*.png``. Every number on that page is read from a
``runs/<experiment>/<run>/result.json`` written by ``senslora bench``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ..core.cache import atomic_dir, atomic_write_text
from ..core.errors import SensloraError
from ..data.guard import path_component
from .budget import budget_section
from .costs import (  # noqa: F401  (re-exported: the report's public names)
    TARGET_ALLOC_OVER_FORWARD,
    TARGET_MEMORY,
    TARGET_STEP_TIME,
    CostGrid,
    cost_lines,
    cost_settings,
    probe_section,
    rank_agreement,
    targets_section,
)
from .forest import FOREST_PNG, ForestGroup, ForestRow, forest_plot, pooled_label, pooled_rows
from .grid import BEST_OF, best_of_source
from .stats import detectable_effect, mean_std, paired_interval, seeds_for_half_width  # noqa: F401
from .sweeps import decided_default, setting_identity, sweep_section
from .tables import _fmt, _label, _matches, _row_key, _setting_name, _table


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every run folder's result.json merged with its bench.json (experiment, grid point)."""
    runs = []
    for result_path in sorted((out / "runs").glob("*/*/result.json")):
        try:
            result = json.loads(result_path.read_text())
            meta = json.loads((result_path.parent / "bench.json").read_text())
        except (OSError, ValueError) as exc:
            raise SensloraError(
                f"{result_path.parent} has an unreadable result.json or bench.json ({exc}); rerun `senslora bench`"
            ) from None
        if not isinstance(result, dict) or "status" not in result:
            raise SensloraError(f"{result_path} is not a senslora result (no status); rerun `senslora bench`")
        _add_generation_mean(result)
        runs.append({**result, "_meta": meta, "_dir": result_path.parent})
    return runs


GENERATION_MEAN = "mean(bleu,rouge1,rougeL)"


def _add_generation_mean(result: dict) -> None:
    """The paper's Table 2 average: BLEU-4, ROUGE-1 and ROUGE-L, each in percent, averaged."""
    m = result.get("metrics") or {}
    if all(isinstance(m.get(k), (int, float)) for k in ("bleu", "rouge1", "rougeL")):
        m[GENERATION_MEAN] = (m["bleu"] + 100 * m["rouge1"] + 100 * m["rougeL"]) / 3


def train_section(name: str, runs: list[dict], plots: Path, *, target_half_width: float | None = None) -> list[str]:
    """Mean ± std per grid point, and paired differences against the experiment's baseline (each
    checked against ``target_half_width`` when the experiment declares one)."""
    ok = [r for r in runs if r["status"] == "ok"]
    lines = [f"## Experiment `{name}` (training)", ""]
    if not ok:
        return lines + ["No completed run.", ""]
    metric_names = sorted({m for r in ok for m in r["metrics"]})
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        groups[_row_key(r)].append(r)
    header = (
        ["setting", "seeds"]
        + [f"{m}" for m in metric_names]
        + ["adapter params", "step time (s)", "peak mem (MB)"]
    )
    rows = []
    for key, members in groups.items():
        cells = [_label(key), str(len(members))]
        for m in metric_names:
            vals = [r["metrics"][m] for r in members if isinstance(r["metrics"].get(m), (int, float))]
            cells.append("–" if not vals else "{:.4f} ± {:.4f}".format(*mean_std(vals)))
        adapter, budget = members[0].get("trainable_params"), members[0].get("budget_params")
        # AdaLoRA trains 1.5x its final budget; show both when they differ.
        cells.append(str(adapter) if budget in (None, adapter) else f"{adapter} (final budget {budget})")
        steps = [r["step_time_median_s"] for r in members if r.get("step_time_median_s")]
        cells.append(_fmt(statistics.fmean(steps)) if steps else "–")
        mems = [r["peak_memory_mb"] for r in members if r.get("peak_memory_mb") is not None]
        cells.append(_fmt(statistics.fmean(mems), 0) if mems else "–")
        rows.append(cells)
    # Tasks differ in their primary metric (accuracy, pearson, rougeL): compare each on its own.
    by_primary: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        by_primary[r["primary_metric"]].append(r)
    primaries = ", ".join(
        f"**{p}** ({', '.join(sorted({str(r.get('task', '?')) for r in rs}))})"
        for p, rs in by_primary.items()
    )
    splits = sorted({r.get("split", "test") for r in ok})
    lines += [
        f"{'/'.join(s.capitalize() for s in splits)}-split metrics, mean ± sample std over seeds. "
        f"Primary metric: {primaries}.",
        "",
    ]
    lines += _table(header, rows) + [""]
    lines += allocation_shape_section(ok)

    baseline = ok[0]["_meta"].get("baseline") or {}
    against = [baseline, *(ok[0]["_meta"].get("also_against") or [])] if baseline else []
    for primary, members in by_primary.items():
        for setting in against:
            lines += paired_section(members, setting, primary, target_half_width=target_half_width)
        # a file name from names read from bench.json / result.json: one safe component
        plot_name = path_component(name if len(by_primary) == 1 else f"{name}-{primary}", "plot", escape=True)
        _bar_plot(
            plot_name,
            {k: [r for r in g if r["primary_metric"] == primary] for k, g in groups.items()},
            primary,
            plots,
        )
        lines += [f"![{plot_name}](plots/{plot_name}.png)", ""]
    cost_name = path_component(f"{name}-cost", "plot", escape=True)
    grid = cost_settings(ok)
    if grid is not None and _cost_plot(name, cost_name, grid, plots):
        lines += [f"![{cost_name}](plots/{cost_name}.png)", ""]
    return lines


def _same_setting(run: dict, setting: dict) -> bool:
    grid = run["_meta"]["grid"]
    return all(json.dumps(grid.get(k), sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in setting.items())


# Concentration figures shown per setting (key in method_record.concentration, digits).
SHAPE_COLUMNS = (
    ("median_rank", 1),
    ("max_rank_over_avg", 2),
    ("top_matrix_share", 3),
    ("top5pct_share", 3),
    ("rank_gini", 2),
)


def _ranks(run: dict) -> dict | None:
    return (run.get("method_record") or {}).get("ranks")


def ranks_against_baseline(ok: list[dict], baseline: dict) -> dict[tuple, str]:
    """Per setting (grid point without the seed) of the runs that allocate ranks: ``"baseline"``,
    ``"no change in ranks"`` when every seed allocates exactly the baseline's ranks at that seed (its
    metric differences are then training noise, not an effect of the setting), or ``"differ (k/n
    seeds)"``. Empty when the baseline has no recorded ranks."""
    base = {r["seed"]: _ranks(r) for r in ok if baseline and _same_setting(r, baseline) and _ranks(r)}
    if not base:
        return {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        if _ranks(r):
            groups[_row_key(r)].append(r)
    verdicts = {}
    for key, members in groups.items():
        differ = sum(_ranks(m) != base.get(m["seed"]) for m in members)
        if _same_setting(members[0], baseline):
            verdicts[key] = "baseline"
        else:
            verdicts[key] = "no change in ranks" if not differ else f"differ ({differ}/{len(members)} seeds)"
    return verdicts


def allocation_shape_section(ok: list[dict]) -> list[str]:
    """Concentration of the allocated ranks per setting (senslora runs), and whether a setting
    allocates exactly the ranks of the experiment's baseline (:func:`ranks_against_baseline`)."""
    # Runs written before concentration was recorded still have their ranks: "–" for the shape.
    alloc = [r for r in ok if _ranks(r)]
    if not alloc:
        return []
    verdicts = ranks_against_baseline(ok, alloc[0]["_meta"].get("baseline") or {})
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in alloc:
        groups[_row_key(r)].append(r)
    header = ["setting", "recipe", "median rank", "max / avg rank", "top matrix", "top 5%", "rank Gini"]
    header += ["ranks vs baseline"] if verdicts else []
    rows = []
    for key, members in groups.items():
        conc = [m["method_record"].get("concentration") for m in members]
        means = (
            [_fmt(statistics.fmean(c[k] for c in conc), d) for k, d in SHAPE_COLUMNS]
            if all(conc)
            else ["–"] * len(SHAPE_COLUMNS)
        )
        row = [_label(key), str(members[0]["method_record"].get("recipe", "–")), *means]
        if verdicts:
            verdict = verdicts[key]
            row.append(f"**{verdict}**" if verdict == "no change in ranks" else verdict)
        rows.append(row)
    return [
        "Allocation shape (mean over seeds; shares are of the LoRA parameters, the top 5% of matrices by parameters):",
        "",
        *_table(header, rows),
        "",
    ]


def paired_diffs(ok: list[dict], baseline: dict, metric: str) -> dict[tuple, list[float]]:
    """Per setting (grid point without the seed), the per-seed differences setting − baseline in
    ``metric``, pairing each run with the baseline run at the same seed and the same other grid values."""
    drop = ("seed", *baseline)
    base = {
        (_row_key(r, drop), r["seed"]): r["metrics"].get(metric) for r in ok if _matches(r, baseline)
    }
    diffs: dict[tuple, list[float]] = defaultdict(list)
    for r in ok:
        if _matches(r, baseline):
            continue
        b = base.get((_row_key(r, drop), r["seed"]))
        if b is not None and r["metrics"].get(metric) is not None:
            diffs[_row_key(r)].append(r["metrics"][metric] - b)
    return diffs


def paired_section(ok: list[dict], baseline: dict, primary: str, *, target_half_width: float | None = None) -> list[str]:
    """Per seed, setting − baseline on the primary metric; mean, 95% interval and wins; with
    ``target_half_width``, one sentence saying whether every interval is that narrow
    (:func:`half_width_line`)."""
    diffs = paired_diffs(ok, baseline, primary)
    if not diffs:
        return []
    base_label = ", ".join(f"{k}={v}" for k, v in baseline.items())
    unchanged = {k for k, v in ranks_against_baseline(ok, baseline).items() if v == "no change in ranks"}
    rows, widths = [], {}
    for key, d in diffs.items():
        m, lo, hi = paired_interval(d)
        widths[_label(key)] = ((hi - lo) / 2, d)
        wins = sum(x > 0 for x in d)
        sd = statistics.stdev(d) if len(d) > 1 else math.nan
        rows.append(
            [
                _label(key) + (" (**no change in ranks**: not evidence)" if key in unchanged else ""),
                str(len(d)),
                f"{m:+.4f}",
                f"[{lo:+.4f}, {hi:+.4f}]" if not math.isnan(lo) else "–",
                f"{wins}/{len(d)}",
                _fmt(sd),
                _fmt((hi - lo) / 2),
                _fmt(detectable_effect(sd, len(d)) if len(d) > 1 else math.nan),
            ]
        )
    header = ["setting", "pairs", "mean diff", "95% interval", "wins", "sd of diff", "half-width", "detectable"]
    return (
        [f"Paired difference in {primary} against {base_label} (same seed, same split):", ""]
        + _table(header, rows)
        + [
            "",
            "sd of diff: standard deviation of the per-seed differences; half-width: of the 95% interval; "
            "detectable: the smallest true difference this many pairs detect with 80% power (two-sided 5% "
            "paired t-test, at the observed sd).",
            "",
        ]
        + (half_width_line(widths, target_half_width, primary) if target_half_width else [])
    )


def half_width_line(widths: dict[str, tuple[float, list[float]]], target: float, primary: str) -> list[str]:
    """Whether every setting's 95% half-width (``widths``: label -> (half-width, differences)) is at
    most ``target``; for those that are not, the pairs that would reach it at the observed sd."""
    too_wide = {k: v for k, v in widths.items() if not v[0] <= target}  # nan (one pair) is too wide
    widest = max(widths, key=lambda k: -1.0 if math.isnan(widths[k][0]) else widths[k][0])
    if not too_wide:
        return [f"Target half-width (`target_half_width`) {target:g} {primary}: **met** by every setting; "
                f"the widest is {_fmt(widths[widest][0])} ({widest}).", ""]
    needs = "; ".join(
        f"{k}: {_fmt(h)}" + (f", about {seeds_for_half_width(statistics.stdev(d), target)} pairs at its sd"
                             if len(d) > 1 else ", one pair")
        for k, (h, d) in too_wide.items()
    )
    return [f"Target half-width (`target_half_width`) {target:g} {primary}: **not met** by "
            f"{len(too_wide)} of {len(widths)} settings ({needs}).", ""]


def _digits(x: float) -> int:
    return 2 if abs(x) >= 2 else 3


def _verdict(lo: float, hi: float) -> str:
    if math.isnan(lo):
        return ""
    return "**win**" if lo > 0 else ("**loss**" if hi < 0 else "tie")


def _diff_cell(d: list[float]) -> str:
    if not d:
        return "–"
    m, lo, hi = paired_interval(d)
    k = _digits(m)
    interval = f" [{lo:+.{k}f}, {hi:+.{k}f}]" if not math.isnan(lo) else ""
    return f"{m:+.{k}f}{interval} {sum(x > 0 for x in d)}/{len(d)} {_verdict(lo, hi)}".rstrip()


def _headline_experiments(by_exp: dict[str, list[dict]], hidden: frozenset[str]) -> list[tuple[str, list[dict], list[dict]]]:
    """(name, ok training runs, [baseline, *also_against]) of every experiment in the headline."""
    out = []
    for name, members in by_exp.items():
        ok = [r for r in members if r["status"] == "ok" and r["_meta"]["kind"] == "train"]
        if name not in hidden and ok and ok[0]["_meta"].get("also_against"):
            out.append((name, ok, [ok[0]["_meta"]["baseline"], *ok[0]["_meta"]["also_against"]]))
    return out


def _setting_of(key: tuple) -> dict:
    return {k: json.loads(v) for k, v in key}


def _headline_key(run: dict) -> tuple:
    """A run's headline setting: its grid point without seed and task, every value taken from a
    validation sweep written as the bare ``best-of:`` (each setting's own tuned rate), so one setting
    tuned on each experiment's own sweep (the encoder's and the decoder's) is one row."""

    def tuned(v):
        if isinstance(v, dict):
            return {k: tuned(x) for k, x in v.items()}
        return BEST_OF if isinstance(v, str) and v.startswith(BEST_OF) else v

    return tuple((k, json.dumps(tuned(v), sort_keys=True)) for k, v in run["_meta"]["grid"].items() if k not in ("seed", "task"))


def _run_setting_name(run: dict) -> str:
    """The headline's name of a run's setting: its grid point without seed and task."""
    return _setting_name(_setting_of(_headline_key(run)))


def _method_of(setting: dict) -> str | None:
    inner = setting.get("variant") if isinstance(setting.get("variant"), dict) else setting
    return inner.get("method")


def _headline_columns(exps: list[tuple]) -> list[tuple]:
    """(experiment, its runs on the task, its comparisons, task, metric, is primary) per headline column."""
    columns = []
    for name, ok, against in exps:
        for task in dict.fromkeys(str(r["task"]) for r in ok):
            in_task = [r for r in ok if str(r["task"]) == task]
            columns.append((name, in_task, against, task, in_task[0]["primary_metric"], True))
            if any(GENERATION_MEAN in r["metrics"] for r in in_task):
                columns.append((name, in_task, against, task, GENERATION_MEAN, False))
    return columns


def _repeated_tasks(columns: list[tuple]) -> set[str]:
    """Tasks with a primary column in more than one experiment (their labels then name it)."""
    primary = [c[3] for c in columns if c[5]]
    return {t for t in primary if primary.count(t) > 1}


def _headline_settings(exps: list[tuple]) -> tuple[list[tuple], list[dict]]:
    """The headline's settings (:func:`_headline_key`), the baseline and the comparisons first (in
    the order of their names), then file order; and the comparisons."""
    comparisons = list({json.dumps(a, sort_keys=True): a for _, _, against in exps for a in against}.values())
    settings = list(dict.fromkeys(_headline_key(r) for _, ok, _ in exps for r in ok))
    order = list(dict.fromkeys(_setting_name(a) for a in comparisons))

    def rank(key: tuple) -> int:
        name = _setting_name(_setting_of(key))
        return order.index(name) if name in order else len(order)

    return sorted(settings, key=rank), comparisons


def _poolable_model(runs: list[dict]) -> str | None:
    """The model of a classification or regression task (``problem`` in result.json; results written
    before it was recorded count as one unless they hold generation metrics) whose runs all share
    one model; None otherwise (generation, or several models)."""
    problems = {r.get("problem") for r in runs}
    if None in problems:
        poolable = not any(GENERATION_MEAN in r["metrics"] for r in runs)
    else:
        poolable = problems <= {"classification", "regression"}
    models = {r.get("model", r.get("config", {}).get("model")) for r in runs}
    return str(models.pop()) if poolable and len(models) == 1 and None not in models else None


def forest_groups(exps: list[tuple]) -> tuple[list[ForestGroup], str]:
    """The forest plot's rows: per headline task (primary metric), every setting's paired
    differences against its experiment's baseline (the numbers of the headline table's first "vs"
    column); then, per model with 2+ classification / regression tasks (the encoder tasks; never
    tasks of different models), one pooled group with a row per setting
    (:func:`senslora.bench.forest.pooled_rows`: their raw per-(task, seed) differences in one
    sample). Also the baseline's name."""
    columns = [c for c in _headline_columns(exps) if c[5]]
    repeated = _repeated_tasks(columns)
    settings, _ = _headline_settings(exps)
    groups: list[ForestGroup] = []
    by_model: dict[str, list[ForestGroup]] = defaultdict(list)
    for name, in_task, against, task, metric, _ in columns:
        diffs = paired_diffs(in_task, against[0], metric)
        rows = []
        for key in settings:
            mine = [r for r in in_task if _headline_key(r) == key]
            if mine and not all(_matches(r, against[0]) for r in mine) and diffs.get(_row_key(mine[0])):
                rows.append(ForestRow(_setting_name(_setting_of(key)), diffs[_row_key(mine[0])]))
        if rows:
            groups.append(ForestGroup(task + (f" ({name})" if task in repeated else ""), metric, rows))
            model = _poolable_model(in_task)
            if model is not None:
                by_model[model].append(groups[-1])
    for model, tasks in by_model.items():
        pooled = pooled_rows(tasks)  # only settings with differences in 2+ of the model's tasks
        if pooled:
            metrics = ", ".join(dict.fromkeys(g.metric for g in tasks))
            groups.append(ForestGroup(pooled_label(model), metrics, pooled, pooled_from=[g.label for g in tasks]))
    baseline = " / ".join(dict.fromkeys(_setting_name(against[0]) for _, _, against in exps))
    return groups, baseline


def _forest_caption(groups: list[ForestGroup], baseline: str) -> str:
    text = (
        f"Per task, each setting's paired difference against {baseline} on the task's primary metric: "
        "mean and 95% t-interval over seeds (pairs in brackets), the numbers of the tables; green or red "
        "where the interval excludes zero."
    )
    for group in groups:
        if group.pooled:
            text += (
                f" *{group.label}*: per setting, the raw per-(task, seed) differences of that model's "
                f"classification / regression tasks ({', '.join(group.pooled_from)}) pooled into one sample with one "
                f"t-interval; their metrics ({group.metric}) are pooled as they are, not rescaled."
            )
    return text


def _interval_cell(row: ForestRow | None) -> str:
    if row is None:
        return "–"
    k = _digits(row.mean)
    cell = f"{row.mean:+.{k}f}" + (f" [{row.lo:+.{k}f}, {row.hi:+.{k}f}]" if not math.isnan(row.lo) else "")
    return f"**{cell}**" if row.verdict in ("win", "loss") else cell


def short_table(groups: list[ForestGroup], baseline: str) -> list[str]:
    """Setting x task: the difference against the baseline with its interval (the forest plot's
    rows), and per setting the tasks it wins / ties / loses on; with its caption."""
    settings = list(dict.fromkeys(r.setting for g in groups for r in g.rows))
    header = ["setting", *(g.label if g.pooled else f"{g.label} {g.metric}" for g in groups), "W/T/L"]
    rows = []
    for setting in settings:
        cells = {g.label: next((r for r in g.rows if r.setting == setting), None) for g in groups}
        verdicts = [cells[g.label].verdict for g in groups if not g.pooled and cells[g.label] is not None]
        wtl = "/".join(str(verdicts.count(v)) for v in ("win", "tie", "loss"))
        rows.append([setting, *(_interval_cell(cells[g.label]) for g in groups), wtl])
    return [
        *_table(header, rows),
        "",
        f"Cells: difference against {baseline}, paired by seed: mean [95% t-interval], **bold** where the "
        "interval excludes zero; W/T/L: the tasks (not the pooled column) on which the setting wins, ties "
        "and loses.",
        "",
    ]


def headline_section(
    by_exp: dict[str, list[dict]],
    hidden: frozenset[str] = frozenset(),
    *,
    figure: str | None = None,
    short: bool = False,
    default: dict | None = None,
) -> list[str]:
    """One table, setting x task, over every experiment that declares `also_against` (except those
    in ``hidden``, whose quality tables stay in their own sections; their costs still count): per
    task the mean of the primary metric (and, for generation, the mean of BLEU-4, ROUGE-1 and
    ROUGE-L) and the paired difference against the experiment's baseline and each further
    comparison, with its 95% interval, wins over seeds, and "win" / "loss" where the interval
    excludes zero ("tie" otherwise); then one sentence per senslora setting and comparison saying
    on which tasks it wins, ties and loses; then the cost tables. ``figure``: the link to the
    forest plot (:func:`forest_groups`), shown with its caption above the table. ``short`` (the
    README's form): the figure, the short table (:func:`short_table`) instead of the full one, the
    sentences of the ``default`` alone when one was decided (:func:`~senslora.bench.sweeps.decided_default`,
    otherwise every senslora setting's); no cost tables. ``default`` also gets a sentence naming it."""
    exps = _headline_experiments(by_exp, hidden)
    cost = [] if short else cost_lines(by_exp)
    if not exps:
        return ["## Headline", "", *cost] if cost else []
    columns = _headline_columns(exps)
    repeated = _repeated_tasks(columns)
    settings, comparisons = _headline_settings(exps)
    header = ["setting"]
    for name, _, against, task, metric, _ in columns:
        header += [f"{task} {metric}" + (f" (`{name}`)" if task in repeated else "")]
        header += [f"vs {_setting_name(a)}" for a in against]
    verdicts: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # [setting][comparison][verdict]
    rows = [_headline_row(key, columns, repeated, verdicts) for key in settings]
    names = ", ".join(dict.fromkeys(_setting_name(a) for a in comparisons))
    groups, baseline = forest_groups(exps)
    experiments = ", ".join(f"`{name}`" for name, _, _ in exps)
    figure_lines = (
        [f"![paired differences against {baseline}, per task and setting]({figure})", "", _forest_caption(groups, baseline), ""]
        if figure and groups
        else []
    )
    figure_lines += _tuned_note(exps)
    chosen = _default_settings(exps, default)
    if chosen:
        figure_lines += [
            f"The default, chosen by the decision rule on the validation sweeps before these runs "
            f"(`{default['setting']}`, mean validation score {default['mean']:.4f}): "
            + ", ".join(f"**{_setting_name(_setting_of(k))}**" for k in chosen) + " in this table.",
            "",
        ]
    if short:
        return [
            "## Headline",
            "",
            f"### Every method against {baseline} ({experiments})",
            "",
            *figure_lines,
            *short_table(groups, baseline),
            *_verdict_lines(chosen or settings, verdicts),
            *_warned_runs([r for _, ok, _ in exps for r in ok]),
        ]
    return [
        "## Headline",
        "",
        f"### Every method against {names} ({experiments})",
        "",
        *figure_lines,
        *_table(header, rows),
        "",
        "Cells: mean ± sd over seeds (seeds); differences are paired by seed: mean [95% t-interval] "
        "wins/pairs, **win** or **loss** where the interval excludes zero, tie otherwise.",
        "",
        *_verdict_lines(settings, verdicts),
        *_warned_runs([r for _, ok, _ in exps for r in ok]),
        *cost,
    ]


def _tuned_note(exps: list[tuple]) -> list[str]:
    """One line naming, per setting, the validation sweeps its ``best-of`` values came from (so a
    setting that borrowed another method's rate shows it)."""
    sources: dict[str, set[str]] = defaultdict(set)
    for _, ok, _ in exps:
        for r in ok:
            for key, value in r["_meta"]["params"].items():
                if isinstance(value, str) and value.startswith(BEST_OF):
                    sources[_run_setting_name(r)].add(f"{key} from `{best_of_source(value, r['_meta']['params'])}`")
    if not sources:
        return []
    parts = [f"{name}: {', '.join(sorted(v))}" for name, v in sorted(sources.items())]
    return [f"Values chosen on validation splits (`best-of`), by setting: {'; '.join(parts)}.", ""]


def _headline_row(key: tuple, columns: list[tuple], repeated: set[str], verdicts: dict) -> list[str]:
    """One setting's headline row: per column its mean ± sd (seeds) and the paired difference
    against each comparison; each primary-metric verdict is recorded in ``verdicts``."""
    row = [_setting_name(_setting_of(key))]
    for name, in_task, against, task, metric, primary in columns:
        mine = [r["metrics"][metric] for r in in_task if _headline_key(r) == key
                and isinstance(r["metrics"].get(metric), (int, float))]
        if mine:
            mu, sd = mean_std(mine)
            row.append(f"{mu:.{_digits(mu)}f} ± {sd:.{_digits(mu)}f} ({len(mine)})")
        else:
            row.append("–")
        full_key = next((_row_key(r) for r in in_task if _headline_key(r) == key), None)
        for a in against:
            if full_key and all(_matches(r, a) for r in in_task if _row_key(r) == full_key):
                row.append("baseline")
                continue
            d = paired_diffs(in_task, a, metric).get(full_key, []) if full_key else []
            row.append(_diff_cell(d))
            verdict = _verdict(*paired_interval(d)[1:]) if len(d) > 1 else ""
            if primary and verdict:
                label = task + (f" (`{name}`)" if task in repeated else "")
                verdicts[key][_setting_name(a)][verdict.strip("*")].append(label)
    return row


def _default_settings(exps: list[tuple], default: dict | None) -> list[tuple]:
    """The headline settings that run the decided ``default`` (same method and options; any budget)."""
    if default is None:
        return []
    keys = {}
    for _, ok, _ in exps:
        for r in ok:
            keys.setdefault(_headline_key(r), setting_identity(r))
    return [k for k, ident in keys.items()
            if (ident["method"], ident["options"]) == (default["method"], default["options"])]


def _verdict_lines(settings: list[tuple], verdicts: dict) -> list[str]:
    """Per senslora setting and comparison: the tasks (primary metric, 2+ pairs) it wins, ties and
    loses on, read off the table's intervals."""
    lines = []
    for key in settings:
        if _method_of(_setting_of(key)) != "senslora":
            continue
        for against, by_verdict in verdicts.get(key, {}).items():
            parts = [f"{word} on {', '.join(by_verdict[v])}" for v, word in
                     (("win", "wins"), ("tie", "ties"), ("loss", "loses")) if by_verdict.get(v)]
            lines.append(f"- **{_setting_name(_setting_of(key))}** against {against} (primary metric): "
                         + "; ".join(parts) + ".")
    return [*lines, ""] if lines else []


def _warned_runs(ok: list[dict]) -> list[str]:
    """One line naming the runs that ended with a training warning (a collapsed model: see
    ``training.evaluation.collapse_warning``), per setting and task, so that a cell's spread can be traced to them."""
    warned: dict[str, list[str]] = defaultdict(list)
    for r in ok:
        if r.get("warnings"):
            warned[f"{_run_setting_name(r)} on {r['task']}"].append(str(r["seed"]))
    if not warned:
        return []
    cells = "; ".join(f"{k}: seed {', '.join(sorted(v, key=int))}" for k, v in sorted(warned.items()))
    return [f"Runs that ended with a warning (a classifier that predicts one class, or a regressor no better than the mean label): {cells}.", ""]


def _readme_block(readme: Path, out: Path) -> tuple[str, int, int, str]:
    start, end = f"<!-- senslora report {out} -->", "<!-- /senslora report -->"
    try:
        text = readme.read_text()
    except OSError as exc:
        raise SensloraError(f"cannot read {readme} ({exc.strerror}); pass an existing markdown file to --readme") from None
    i = text.find(start)
    j = text.find(end, i + 1) if i >= 0 else -1
    if i < 0 or j < 0:
        raise SensloraError(f"{readme} has no `{start}` ... `{end}` block; add the two markers where the table goes")
    return text, i, j, start


def write_readme_block(readme: str | Path, out: Path, lines: list[str]) -> Path:
    """Replace the text between README's `<!-- senslora report OUT -->` and `<!-- /senslora report -->`
    markers by ``lines`` (atomically; the rest of the file is kept byte for byte)."""
    readme = Path(readme)
    text, i, j, start = _readme_block(readme, out)
    block = "\n".join(line.replace("### ", "#### ", 1) if line.startswith("### ") else line for line in lines)
    atomic_write_text(readme, text[: i + len(start)] + "\n" + block + "\n" + text[j:])
    return readme


def _bar_plot(name: str, groups: dict[tuple, list[dict]], primary: str, plots: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, means, stds = [], [], []
    for key, members in groups.items():
        vals = [r["metrics"][primary] for r in members if isinstance(r["metrics"].get(primary), (int, float))]
        if vals:
            m, s = mean_std(vals)
            labels.append(_label(key).replace(", ", "\n"))
            means.append(m)
            stds.append(s)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
    ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax.set_ylabel(primary)
    lo = min(m - s for m, s in zip(means, stds, strict=True)) if means else 0
    hi = max(m + s for m, s in zip(means, stds, strict=True)) if means else 1
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_title(f"{name}: test {primary} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(plots / f"{name}.png", dpi=100)
    plt.close(fig)


def _cost_plot(name: str, file_name: str, grid: CostGrid, plots: Path) -> bool:
    """Figure 4's analogue: per setting (:func:`~.costs.cost_settings`), the median training-step
    time and the peak memory against the batch size (means over seeds), the baseline drawn thick.
    False when no run recorded either."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by, base, sizes = grid
    what = (("step_time_median_s", "median step time (s)"), ("peak_memory_mb", "peak memory (MB)"))
    if not any(r.get(key) for per in by.values() for rs in per.values() for r in rs for key, _ in what):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    # more settings than the default cycle's ten colours: twenty distinct ones, so none repeats
    colors = plt.get_cmap("tab20").colors if len(by) > 10 else plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes, what, strict=True):
        for i, (setting, by_size) in enumerate(by.items()):
            xs = [b for b, point in sizes.items() if any(r.get(key) for r in by_size.get(point, []))]
            ys = [statistics.fmean(r[key] for r in by_size[sizes[b]] if r.get(key)) for b in xs]
            ax.plot(xs, ys, marker="o", label=setting, linewidth=2.5 if setting == base else 1.2,
                    color=colors[i % len(colors)])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=6 if len(by) > 6 else 7)
    fig.suptitle(f"{name}: training cost per setting (mean over seeds)")
    fig.tight_layout()
    fig.savefig(plots / f"{file_name}.png", dpi=100)
    plt.close(fig)
    return True


def build_report(out: str | Path, *, command: str | None = None, readme: str | Path | None = None) -> Path:
    """Write RESULTS.md and plots/ from the result files under ``out``; with ``readme``, also
    its headline into that file's marked block (:func:`write_readme_block`)."""
    out = Path(out)
    if not (out / "runs").is_dir():
        raise SensloraError(
            f"{out} holds no benchmark runs (no runs/ folder); run `senslora bench CONFIG --out {out}` first"
        )
    if readme is not None:
        _readme_block(Path(readme), out)  # refuse before writing anything
    runs = load_runs(out)
    declared = _declared_experiments(out)
    hidden = frozenset(name for name, e in declared.items() if e.get("headline", True) is False)
    targets = {name: e["target_half_width"] for name, e in declared.items() if e.get("target_half_width")}
    if not runs:
        raise SensloraError(f"{out}/runs holds no result.json; run `senslora bench CONFIG --out {out}` first")
    path = out / "RESULTS.md"
    # All or nothing: a failed write leaves the previous RESULTS.md and plots/ untouched.
    default = decided_default(runs)
    progress = progress_lines(out, runs)
    with atomic_dir(out / "plots") as plots:
        atomic_write_text(path, "\n".join(_report_lines(out, runs, plots, command, hidden, targets, default, progress)))
    if readme is not None:
        n_ok = sum(r["status"] == "ok" for r in runs)
        here = Path(readme).resolve().parent
        figure = Path(os.path.relpath((out / "plots" / FOREST_PNG).resolve(), here)).as_posix()
        results = Path(os.path.relpath((out / "RESULTS.md").resolve(), here)).as_posix()
        head = headline_section(_by_experiment(runs), hidden=hidden, figure=figure, short=True, default=default)
        note = (f"Written by `senslora report {out} --readme {readme}` from {n_ok} ok runs of "
                f"{len(runs)} result files; every table, and the training and allocation costs, in "
                f"[{results}]({results}).")
        if progress:
            note += " " + progress[0].replace("**", "")
        write_readme_block(readme, out, [note, "", *head[2:]])
    return path


def _declared_experiments(out: Path) -> dict[str, dict]:
    """The experiments of ``out/benchmark.yaml`` (the config of the last ``senslora bench`` into
    ``out``) by name, for what they declare to the report: ``headline: false`` (e.g. a run kept as the
    record of a superseded choice) and ``target_half_width``; {} without that file."""
    config = out / "benchmark.yaml"
    if not config.is_file():
        return {}
    from .grid import load_config

    return {e["name"]: e for e in load_config(config)["experiments"]}


def progress_lines(out: Path, runs: list[dict]) -> list[str]:
    """While ``out/benchmark.yaml`` plans runs that have no ok result yet, one paragraph saying so,
    per experiment with runs left (its ok runs of its planned ones), so that an interim report's
    tables are not read as final; [] when every planned run is ok, or without that file."""
    config = out / "benchmark.yaml"
    if not config.is_file():
        return []
    from .grid import expand, load_config

    planned: dict[str, set[str]] = defaultdict(set)
    for run in expand(load_config(config)):
        planned[run.experiment].add(run.run_id)
    done: dict[str, int] = defaultdict(int)
    for r in runs:
        exp, run_id = r["_dir"].parent.name, r["_dir"].name
        if r["status"] == "ok" and run_id in planned.get(exp, ()):
            done[exp] += 1
    left = [f"`{exp}` {done[exp]} of {len(ids)}" for exp, ids in planned.items() if done[exp] < len(ids)]
    if not left:
        return []
    total, n_done = sum(len(ids) for ids in planned.values()), sum(done.values())
    return [f"**Interim report: {n_done} of the {total} runs that `benchmark.yaml` plans are ok.** "
            f"Experiments with runs left (ok of planned): {', '.join(left)}. Their tables hold the "
            "seeds finished so far and change as the rest land.", ""]


def _by_experiment(runs: list[dict]) -> dict[str, list[dict]]:
    by_exp: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_exp[r["_meta"]["experiment"]].append(r)
    return by_exp


def _projection(by_exp: dict[str, list[dict]]) -> list[str]:
    """The 8B projection from the first probe experiment with 3+ calibration sizes on smollm2."""
    from .projection import projection_lines

    for members in by_exp.values():
        probes = [r for r in members if r["status"] == "ok" and r["_meta"]["kind"] == "allocation-probe"]
        lines = projection_lines(probes) if probes else []
        if lines:
            return lines
    return []


def _report_lines(
    out: Path, runs: list[dict], plots: Path, command: str | None, hidden: frozenset[str],
    targets: dict[str, float], default: dict | None, progress: list[str],
) -> list[str]:
    n_ok = sum(r["status"] == "ok" for r in runs)
    n_reused = sum(bool(r["_meta"].get("reused_from")) for r in runs)
    reused = (
        f"; {n_reused} of them are copies of an earlier experiment's run with the identical training config "
        "(`reuse_from`, named in each copy's bench.json)"
        if n_reused
        else ""
    )
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `senslora report {out}` from {len(runs)} result files ({n_ok} ok, {len(runs) - n_ok} failed{reused}), "
        f"written by `{command or f'senslora bench {out}/benchmark.yaml --out {out}'}`. Every figure on this page is computed from those files; the projection's hardware assumptions are constants stated in `senslora.bench.projection`.",
        "",
    ]
    lines += progress
    lines += targets_section(runs)
    by_exp = _by_experiment(runs)
    groups, baseline = forest_groups(_headline_experiments(by_exp, hidden))
    if groups:
        forest_plot(groups, plots / FOREST_PNG, baseline=baseline)
    lines += headline_section(by_exp, hidden=hidden, figure=f"plots/{FOREST_PNG}", default=default)
    lines += sweep_section(runs)
    for name, members in by_exp.items():
        kind = members[0]["_meta"]["kind"]
        lines += (train_section(name, members, plots, target_half_width=targets.get(name)) if kind == "train"
                  else probe_section(name, members))
        if kind == "train":
            lines += budget_section(name, [r for r in members if r["status"] == "ok"], plots)
        failed = [r for r in members if r["status"] != "ok"]
        if failed:
            lines += (
                ["Failed runs:", ""] + [f"- `{r['_dir'].name}`: {r.get('error', '?')}" for r in failed] + [""]
            )
    lines += _projection(by_exp)
    return lines + environment_section(runs)


def environment_section(runs: list[dict]) -> list[str]:
    """The library versions every run recorded, one line per distinct set with its run count (one
    line when all agree, as within an experiment they must), and the commits the runs came from."""
    sets: Counter = Counter()
    commits: Counter = Counter()
    for r in runs:
        versions = dict(r.get("versions") or {})
        commit = str(versions.pop("git", "unknown"))[:7]
        if versions:
            commits[commit] += 1
            sets[tuple(versions.items())] += 1
    if not sets:
        return []
    lines = ["## Environment", ""]
    if len(sets) == 1:
        lines += [", ".join(f"{k} {v}" for k, v in next(iter(sets))) + f" (all {sum(sets.values())} runs)."]
    else:
        lines += ["The runs recorded different library versions:", ""]
        lines += [f"- {n} run{'s' * (n != 1)}: " + ", ".join(f"{k} {v}" for k, v in vs) for vs, n in sets.most_common()]
    shown = ", ".join(f"{c} ({n})" for c, n in commits.most_common())
    return lines + ["", f"Commits the runs were made from (runs): {shown}.", ""]
