"""Validation sweeps in a benchmark report: each setting's score by learning rate, its winner, whether
that winner sits inside the grid, and the default decision's table (issue 27's rule: the setting
with the best mean validation score over the tasks, each task at the setting's own best rate).

Pure functions of the loaded runs (:func:`senslora.bench.report.load_runs`); the winner rule is
:func:`sweep_winner`, the same one ``best-of`` uses to resolve a rate in a later run.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from typing import Any

from .grid import run_name
from .stats import mean_std
from .tables import _table

SWEPT = "lr"  # the grid key a validation sweep varies


def sweep_winner(scores: dict[Any, list[float]]) -> Any:
    """The value with the highest mean score; ties go to the larger value (the same rule everywhere
    a sweep is read: ``best-of`` in a run, the sweep and decision tables in the report)."""
    if not scores:
        raise ValueError("a sweep with no scores has no winner")
    return max(scores, key=lambda v: (statistics.fmean(scores[v]), v))


def setting_identity(run: dict) -> dict[str, Any]:
    """What a validation run compares, as data: its method, its options and its rank (what the
    decision rule reads; :func:`setting_key` is its printed name). The options hold the init the run
    recorded having used (``method_record.init``) where they left it to the default, so a setting
    is the same before and after the default init changes."""
    config = run.get("config") or {}
    options = dict(config.get("options") or {})
    recorded = (run.get("method_record") or {}).get("init")
    if recorded is not None:
        options.setdefault("init", recorded)
    return {"method": str(config.get("method", run.get("method", "?"))), "options": options, "rank": config.get("avg_rank")}


def is_zero_init(options: dict[str, Any]) -> bool:
    """Whether a setting's options are senslora's zero init and nothing else (the robust preset as
    ``--preset robust`` ran it before any init existed)."""
    return all(k == "init" and v == "zero" for k, v in options.items())


def setting_key(run: dict) -> str:
    """What a validation run compares, without its task, model, seed and rate: the method and its
    options as they ran (:func:`setting_identity`; zero init, the default before any init existed,
    goes unnamed), e.g. ``"senslora, init=gradient, rank 4"``."""
    identity = setting_identity(run)
    parts = [identity["method"]]
    parts += [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
              for k, v in sorted(identity["options"].items()) if not (k == "init" and v == "zero")]
    if identity["rank"] is not None:
        parts.append(f"rank {identity['rank']}")
    return ", ".join(parts)


def task_key(run: dict) -> str:
    """The column a validation run belongs to: ``"movie-polarity (minilm)"``."""
    config = run.get("config") or {}
    return f"{config.get('task', run.get('task', '?'))} ({config.get('model', run.get('model', '?'))})"


def run_id(run: dict) -> str | None:
    """:func:`~senslora.bench.grid.run_name` of a loaded run's folder (None without one)."""
    folder = run.get("_dir")
    return run_name(folder) if folder is not None else None


def validation_runs(runs: list[dict]) -> list[dict]:
    """The ok training runs scored on a validation split that vary the swept key. A copy of a run
    (``reuse_from``: the same config, so the same seed's score) counts once: a copy whose original
    is among the runs is left out, so a sweep reused by a later experiment keeps its seed count."""
    present = {run_id(r) for r in runs}
    return [
        r
        for r in runs
        if r["status"] == "ok"
        and r["_meta"]["kind"] == "train"
        and r.get("split") == "validation"
        and SWEPT in r["_meta"]["grid"]
        and r["_meta"].get("reused_from") not in present
    ]


def sweep_cells(runs: list[dict]) -> dict[tuple[str, str], dict[float, list[float]]]:
    """(setting, task) -> rate -> the primary validation metric of each seed."""
    cells: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        value = r["metrics"].get(r["primary_metric"])
        if isinstance(value, (int, float)):
            cells[(setting_key(r), task_key(r))][r["config"][SWEPT]].append(float(value))
    return cells


def winner_summary(by_rate: dict[float, list[float]]) -> dict[str, Any]:
    """The winner of one sweep, its mean, its seeds, and where it sits in the grid."""
    best = sweep_winner(by_rate)
    rates = sorted(by_rate)
    edge = "top" if best == rates[-1] else ("bottom" if best == rates[0] else "")
    seeds = min(len(v) for v in by_rate.values())
    return {"rate": best, "mean": statistics.fmean(by_rate[best]), "edge": edge, "seeds": seeds, "rates": len(rates)}


def setting_identities(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Each setting's printed name (:func:`setting_key`) -> its :func:`setting_identity`."""
    return {setting_key(r): setting_identity(r) for r in runs}


def decision_rows(
    cells: dict[tuple[str, str], dict[float, list[float]]], identities: dict[str, dict[str, Any]]
) -> tuple[list[str], list[dict]]:
    """Tasks, and one row per setting: its method and options (``identities``, from
    :func:`setting_identities`), its winner per task and the mean of the winners' scores over the
    tasks it has (``complete`` only when it has all of them), best first."""
    tasks = sorted({t for _, t in cells})
    rows = []
    for setting in sorted({s for s, _ in cells}):
        per_task = {t: winner_summary(cells[(setting, t)]) for t in tasks if (setting, t) in cells}
        rows.append(
            {
                "setting": setting,
                **identities[setting],
                "per_task": per_task,
                "mean": statistics.fmean(w["mean"] for w in per_task.values()),
                "complete": len(per_task) == len(tasks),
            }
        )
    rows.sort(key=lambda row: (not row["complete"], -row["mean"], row["setting"]))
    return tasks, rows


MIN_SEEDS, MIN_RATES = 3, 4  # issue 27's least sweep: >= 3 seeds x >= 4 rates, winner inside
OURS = "senslora"  # the method whose init the decision chooses (``--preset robust``'s)


def _not_ready(row: dict, tasks: list[str]) -> list[str]:
    """Why one setting's sweeps cannot decide yet (empty when they can)."""
    why = [f"no {t} sweep" for t in tasks if t not in row["per_task"]]
    for t, w in row["per_task"].items():
        if w["seeds"] < MIN_SEEDS or w["rates"] < MIN_RATES:
            why.append(f"{t} has {w['seeds']} seeds x {w['rates']} rates")
        if w["edge"]:
            why.append(f"{t} winner at the {w['edge']} of the grid")
    return why


def decide(tasks: list[str], rows: list[dict]) -> dict[str, Any]:
    """The decision rule on the decision table: ``pending`` (``senslora`` setting -> why it cannot
    decide yet; the rule waits while any is), ``others`` (any other setting -> why its sweep is not
    finished: it cannot change which ``senslora`` setting is best, only what ranks above it), the
    ``ours`` rows, the ``best`` of them (the default) and the ``zero`` init row (:func:`is_zero_init`)."""
    why = {row["setting"]: _not_ready(row, tasks) for row in rows}
    ours = [row for row in rows if row["method"] == OURS]
    mine = {row["setting"] for row in ours}
    return {
        "pending": {k: v for k, v in why.items() if v and k in mine},
        "others": {k: v for k, v in why.items() if v and k not in mine},
        "ours": ours,
        "best": ours[0] if ours else None,
        "zero": next((row for row in ours if is_zero_init(row["options"])), None),
    }


def _reasons(pending: dict[str, list[str]], shown: int = 4) -> str:
    text = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(pending.items())[:shown])
    return text + (f"; and {len(pending) - shown} more" if len(pending) > shown else "")


def decision_verdict(tasks: list[str], rows: list[dict]) -> str:
    """The rule applied to the decision table, in one paragraph: which senslora setting becomes the
    default (zero init unless a senslora init has a higher mean), which settings rank above it,
    or, until every senslora setting has every task at >= 3 seeds x >= 4 rates with an interior
    winner, why nothing is decided yet. Other settings' unfinished sweeps are named, not waited for:
    they cannot change the default."""
    d = decide(tasks, rows)
    ours = len(d["ours"])
    if d["pending"]:
        return (f"**Not decided yet**: {len(d['pending'])} of {ours} {OURS} settings cannot decide "
                f"({_reasons(d['pending'])}).")
    best, zero = d["best"], d["zero"]
    if best is None:
        return f"**No decision**: no `{OURS}` setting in the sweeps."
    if best is zero:
        text = f"**By the rule, zero init stays**: `{best['setting']}` has the best mean of the {OURS} settings ({best['mean']:.4f})"
    else:
        against = "" if zero is None else f" against {zero['mean']:.4f} for zero init ({best['mean'] - zero['mean']:+.4f})"
        text = f"**By the rule, the default becomes `{best['setting']}`**: mean {best['mean']:.4f} over the tasks{against}"
    above = [f"{row['setting']} ({row['mean']:.4f})" for row in rows[: rows.index(best)] if row["setting"] not in d["others"]]
    text += ". Ranked above it: " + ", ".join(above) + "." if above else ". No finished setting ranks above it."
    if d["others"]:
        text += (f" Still sweeping, which cannot change the default, only what ranks above it: "
                 f"{_reasons(d['others'])}.")
    return text


def _decision_table(runs: list[dict]) -> tuple[list[str], list[dict], list[str]] | None:
    """(tasks, decision rows, settings swept at other budgets) of the runs' validation sweeps."""
    chosen = validation_runs(runs)
    cells = sweep_cells(chosen)
    if not cells:
        return None
    return _at_decision_budget(*decision_rows(cells, setting_identities(chosen)))


def _at_decision_budget(tasks: list[str], rows: list[dict]) -> tuple[list[str], list[dict], list[str]]:
    """The decision's share of every setting's rows (:func:`decision_budget`), with the tasks they have."""
    rows, others = decision_budget(rows)
    return [t for t in tasks if any(t in row["per_task"] for row in rows)], rows, others


def decided_default(runs: list[dict]) -> dict[str, Any] | None:
    """The default the validation sweeps decided (its row: ``setting``, ``method``, ``options``,
    ``mean``), or None while the rule waits (or there is no sweep)."""
    table = _decision_table(runs)
    if table is None:
        return None
    d = decide(*table[:2])
    return None if d["pending"] else d["best"]


def sweep_section(runs: list[dict]) -> list[str]:
    """The report's validation-sweep tables: one per task (setting x rate), then the decision table."""
    chosen = validation_runs(runs)
    cells = sweep_cells(chosen)
    if not cells:
        return []
    lines = [
        "## Validation sweeps",
        "",
        "Primary validation metric by learning rate, mean ± sample std over seeds (n). The winner (**bold**) "
        "has the highest mean, ties to the larger rate (the rule `best-of` uses); `edge` marks a winner at the "
        "top or bottom of its grid, which needs the next rate before it decides anything.",
        "",
    ]
    tasks, rows = decision_rows(cells, setting_identities(chosen))
    winners = {(row["setting"], t): w for row in rows for t, w in row["per_task"].items()}
    for task in tasks:
        settings = sorted(s for s, t in cells if t == task)
        rates = sorted({rate for s in settings for rate in cells[(s, task)]})
        body = []
        for s in settings:
            by_rate = cells[(s, task)]
            win = winners[(s, task)]
            row = [s]
            for rate in rates:
                if rate not in by_rate:
                    row.append("–")
                    continue
                m, sd = mean_std(by_rate[rate])
                cell = f"{m:.4f} ± {sd:.4f} ({len(by_rate[rate])})"
                row.append(f"**{cell}**" if rate == win["rate"] else cell)
            row.append(win["edge"] or "inside")
            body.append(row)
        lines += [f"### {task}", ""] + _table(["setting", *(f"lr {r:g}" for r in rates), "winner"], body) + [""]
    tasks, rows, others = _at_decision_budget(tasks, rows)
    body = []
    for row in rows:
        cells_ = []
        for t in tasks:
            w = row["per_task"].get(t)
            cells_.append(
                "–" if w is None else f"{w['mean']:.4f} @ {w['rate']:g} ({w['seeds']}x{w['rates']}{', ' + w['edge'] if w['edge'] else ''})"
            )
        body.append([row["setting"], *cells_, f"{row['mean']:.4f}" + ("" if row["complete"] else " (partial)")])
    lines += [
        "### Default decision table",
        "",
        "Each setting's best mean validation score per task (at its own best rate; seeds x rates, and `edge` "
        "when the winner is at the grid's edge), and their mean over the tasks: the decision rule of "
        "issue 27 ranks settings by that mean. A setting without every task is marked partial and ranked "
        "after the complete ones.",
        "",
    ]
    verdict = "The decision rule applied to this table: " + decision_verdict(tasks, rows)
    lines += _table(["setting", *tasks, "mean over tasks"], body) + ["", verdict, ""]
    if others:
        rank = rows[0]["rank"] if rows else None
        lines += [f"The decision compares settings at rank {rank}, where most were swept; the sweeps at other "
                  f"budgets ({'; '.join(others)}) are in the tables above and take no part in it.", ""]
    return lines


def decision_budget(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The decision compares settings at one budget: the rank most settings were swept at (ties to
    the larger). Returns those rows and the names of the other settings (swept at other ranks)."""
    counts = Counter(row["rank"] for row in rows)
    main = max(counts, key=lambda r: (counts[r], -1 if r is None else r))
    return [row for row in rows if row["rank"] == main], [row["setting"] for row in rows if row["rank"] != main]
