"""What a benchmark run takes from finished runs: ``best-of`` values from validation sweeps,
copies of identical finished runs (``reuse_from``), and the stale check that sets aside a finished
run whose config has changed since (see :mod:`senslora.bench.harness`)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from ..core.cache import atomic_write_text
from ..core.errors import SensloraError
from .grid import BEST_OF, RESULT_NAME, STALE, Run, best_of_source, expand, load_config, train_config
from .sweeps import sweep_winner


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def resolve_params(params: dict[str, Any], out: Path) -> dict[str, Any]:
    """Replace ``KEY: "best-of:EXPERIMENT"`` by the KEY value that won EXPERIMENT on validation
    (EXPERIMENT's ``{KEY}`` placeholders filled from ``params``: :func:`~senslora.bench.grid.best_of_source`).

    The winner maximises the mean over seeds of the final-epoch *validation* value of the runs'
    primary metric (the test split is never used to choose), so e.g. the learning rate of the
    uniform-LoRA baseline is tuned by a sweep that ran earlier in the same benchmark.
    """
    resolved = dict(params)
    for key, value in params.items():
        if not (isinstance(value, str) and value.startswith(BEST_OF)):
            continue
        experiment = best_of_source(value, params)
        missing = _not_run(experiment, out)
        if missing:
            # Choosing from a sweep that has not run every grid point (e.g. a later experiment run
            # first with --only) would give this run another value than the finished sweep will.
            raise SensloraError(
                f"{key}: {value} needs every run of {experiment!r} to finish; {len(missing)} have not run "
                f"yet (e.g. {missing[0]}): run that experiment first"
            )
        scores: dict[str, list[float]] = {}
        for result_path in sorted((out / "runs" / experiment).glob("*/result.json")):
            result = json.loads(result_path.read_text())
            if result.get("status") != "ok":
                # Choosing from a partial sweep would let later runs use another value than earlier ones.
                raise SensloraError(
                    f"{key}: {value} needs every run of {experiment!r} to finish; {result_path.parent.name} did not"
                )
            if result.get("split") == "validation":
                last = result.get("metrics", {})  # a validation-only run: its final evaluation
            elif not result.get("history"):
                continue
            else:
                last = result["history"][-1].get("validation", {})
            metric = last.get(result["primary_metric"])
            if metric is not None:
                scores.setdefault(json.dumps(result["config"][key]), []).append(metric)
        if not scores:
            raise SensloraError(f"{key}: {value} needs finished runs of experiment {experiment!r} first")
        values = {k: json.loads(k) for k in scores}
        if all(isinstance(v, (int, float)) for v in values.values()):  # ties go to the larger number
            resolved[key] = sweep_winner({values[k]: s for k, s in scores.items()})
        else:
            resolved[key] = values[sweep_winner(scores)]
    return resolved


def _not_run(experiment: str, out: Path) -> list[str]:
    """The run ids of ``experiment`` in the config the harness saved in ``out`` (``benchmark.yaml``)
    that have no result yet; empty when there is no saved config or it has no such experiment."""
    saved = out / "benchmark.yaml"
    if not saved.is_file():
        return []
    folders = _saved_runs(str(saved), saved.stat().st_mtime_ns).get(experiment, [])
    return [run_id for run_id in folders if not (out / "runs" / experiment / run_id / RESULT_NAME).is_file()]


@functools.lru_cache(maxsize=4)
def _saved_runs(path: str, mtime_ns: int) -> dict[str, list[str]]:
    """Experiment -> run ids of a saved config (cached per file version: the harness asks once a run)."""
    runs: dict[str, list[str]] = {}
    for run in expand(load_config(path)):
        runs.setdefault(run.experiment, []).append(run.run_id)
    return runs


def _set_aside(folder: Path, out: Path, label: str, change: str, counts: dict[str, int], dry_run: bool) -> None:
    """Move a finished run whose config changed since (``change``, e.g. the sweep it takes best-of
    from now picks another value) to ``runs/<experiment>/.stale/``, out of the report's reach, so
    that it is run again; skipping it would mix two settings in one table."""
    stale = folder.parent / STALE / folder.name
    counts["stale"] += 1
    if dry_run:
        print(f"{label}: finished with {change}; would move it to {stale.relative_to(out)} and run again")
        return
    print(f"{label}: finished with {change}; moved to {stale.relative_to(out)}, to run again", flush=True)
    shutil.rmtree(stale, ignore_errors=True)
    stale.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(stale)


def _config_change(run: Run, folder: Path, out: Path) -> str | None:
    """For a finished ``train`` run: which fields of its recorded TrainConfig differ from the
    config it would get now (``best-of`` resolved), as ``"lr 0.004 (now 0.002)"``; ``""`` when equal;
    None when that cannot be told (not a train run, no readable config, or a sweep it depends on has
    not finished). Only fields recorded then are compared: a field added to TrainConfig later does
    not make old runs stale."""
    if run.kind != "train":
        return None
    try:
        now = _config_record(params=resolve_params(run.params, out))
        result = json.loads((folder / RESULT_NAME).read_text())
    except (SensloraError, OSError, ValueError):
        return None
    if not isinstance(result, dict):
        return None
    before, now = _comparable(result, now)
    if not isinstance(before, dict):
        return None
    keys = sorted(k for k in set(now) & set(before) if now[k] != before[k])
    return ", ".join(f"{k} {before[k]!r} (now {now[k]!r})" for k in keys)


def _config_record(params: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig of resolved ``params`` as a run records it in result.json (JSON types, the
    method's implied options added), with ``options.init`` set to the init the run would use (the
    method's :meth:`~senslora.training.methods.base.Method.init_for`): a run that leaves the init to
    a default is compared by the init it gets, so a changed default never passes for the old one."""
    from ..training.methods import get_method
    from ..training.train import recorded_config

    config = recorded_config(train_config(params))
    record = json.loads(json.dumps(config.to_dict(), default=str))
    init = get_method(config.method).init_for(config.options)
    if init is not None:
        record["options"] = {**record.get("options", {}), "init": init}
    return record


def _comparable(result: dict[str, Any], now: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(a finished run's recorded config, ``now``) ready to compare: the recorded ``options.init``
    set to the init it ran with (``method_record.init``) where its options left it to the default;
    a run that recorded no init (made before inits existed) is compared without it, as it was then."""
    before = result.get("config")
    if not isinstance(before, dict) or not isinstance(before.get("options") or {}, dict):
        return before, now
    options = dict(before.get("options") or {})
    ran = (result.get("method_record") or {}).get("init")
    if "init" in options:
        return before, now
    if ran is not None:
        return {**before, "options": {**options, "init": ran}}, now
    if isinstance(now.get("options"), dict):
        now = {**now, "options": {k: v for k, v in now["options"].items() if k != "init"}}
    return before, now


def reusable_run(run: Run, params: dict[str, Any], out: Path) -> Path | None:
    """The folder of an ok run in ``run.reuse_from`` whose resolved TrainConfig equals this run's
    (``params`` already resolved), or None. The first match in sorted folder order wins."""
    if run.kind != "train" or not run.reuse_from:
        return None
    wanted = _config_record(params)
    here = library_versions()
    for experiment in run.reuse_from:
        for folder, result in _ok_results(out, experiment):
            if _same_config(*_comparable(result, wanted)) and library_versions(result.get("versions") or {}) == here:
                return folder
    return None


def _ok_results(out: Path, experiment: str):
    """(folder, result) of each readable ok run of ``experiment`` under ``out``, in folder order."""
    for result_path in sorted((out / "runs" / experiment).glob(f"*/{RESULT_NAME}")):
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and result.get("status") == "ok":
            yield result_path.parent, result


def _same_config(before: Any, now: dict[str, Any]) -> bool:
    """Whether a run's recorded config equals ``now``; a field added to TrainConfig after it was
    recorded counts as equal where ``now`` holds that field's default (the run ran as it says)."""
    from ..training.config import TrainConfig

    if not isinstance(before, dict) or set(before) - set(now):
        return False
    defaults = TrainConfig().to_dict()
    return all(before[k] == v if k in before else v == defaults.get(k) for k, v in now.items())


def _copy_run(source: Path, folder: Path, meta: dict[str, Any]) -> None:
    """Copy a finished run folder (without its checkpoints) to ``folder``, atomically."""
    from ..training.checkpoint import CHECKPOINTS_DIR

    tmp = folder.with_name(folder.name + ".reuse-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(CHECKPOINTS_DIR))
    write_json(tmp / "bench.json", meta)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


# The libraries whose version changes a run's numbers; python, senslora's own version and its git
# revision are recorded too but do not decide (a commit that changes training semantics is handled
# by the config record and by rerunning, see the harness docs).
LIBRARIES = ("torch", "transformers", "peft", "accelerate")


def library_versions(versions: dict[str, Any] | None = None) -> dict[str, str]:
    """{library: version} of a result's ``versions`` record, or of this environment when None."""
    if versions is None:
        from ..core.pipeline import package_versions

        versions = package_versions()
    return {k: str(versions.get(k)) for k in LIBRARIES}


def check_one_version(experiments: set[str], out: Path, current: dict[str, str]) -> None:
    """Refuse to add runs to an experiment (``experiments``: those with runs still to do) whose
    finished runs ran on other library versions: one experiment's table must not mix, e.g.,
    transformers 5.24 and 5.25 (issue 27). Called before any run starts; the message names the
    experiment, the versions, and the two ways out."""
    for experiment in sorted(experiments):
        for _, result in _ok_results(out, experiment):
            if not result.get("versions"):
                continue
            before = library_versions(result["versions"])
            if before != current:
                diff = ", ".join(f"{k} {before[k]} (here {current[k]})" for k in LIBRARIES if before[k] != current[k])
                raise SensloraError(
                    f"experiment {experiment!r} in {out} holds runs made with {diff}; run the rest in an "
                    "environment with those versions (scripts/setup.sh pins them) or write into a new --out"
                )
            break  # one ok run tells the experiment's versions: this check keeps them all equal
