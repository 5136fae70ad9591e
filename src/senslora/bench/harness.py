"""Benchmark harness: a YAML config of experiments -> one folder and one ``result.json`` per run.

Config format (see ``benchmarks/*.yaml``)::

    defaults:                                     # per kind, merged into every run's parameters
      train: {model: minilm, epochs: 1}
    experiments:
      - name: main                                # folder results/<out>/runs/main/...
        kind: train                               # train | allocation-probe
        grid: {method: [lora, senslora], seed: [0, 1, 2]}   # cartesian product; a mapping value
                                                            # sets several params at once
        params: {task: movie-polarity, avg_rank: 4}          # fixed for this experiment
        per_method: {full: {lr: "best-of:lr-full"}}          # overrides for one method's runs
        baseline: {method: lora}                  # report: paired differences against this row
        also_against: [{method: eva}]             # report: further paired comparisons
        reuse_from: [pilot]                       # copy a finished run of these experiments whose
                                                  # resolved TrainConfig is identical, not rerun it
        headline: true                            # report: false leaves it out of the headline

``train`` runs are :func:`senslora.training.train.train` with :class:`~senslora.training.train.TrainConfig` fields
(keys ``options.NAME`` go into ``TrainConfig.options``); ``allocation-probe`` runs are
:func:`senslora.bench.profiling.allocation_probe`. Every run executes in its own Python process (its
memory peak is its own, a crash cannot stop the others). Runs whose ``result.json`` says
``status: ok`` are skipped, so an interrupted benchmark resumes where it stopped; a failed run is
recorded with its error and retried on the next invocation.

The whole config is checked before any run (:func:`check_runs`): unknown keys at every level,
and every run's TrainConfig (or probe keywords) built and validated as its worker will, so a
``--dry-run`` fails exactly when a real run would fail on its config.

A value ``"best-of:EXPERIMENT"`` is replaced, just before the run starts, by the value of that
parameter that maximised the validation metric in EXPERIMENT (e.g. a learning-rate sweep).

``reuse_from`` lists earlier experiments of the same config. A ``train`` run whose resolved
:class:`~senslora.training.config.TrainConfig` (after ``best-of``) equals that of an ok run of one
of them is not trained again: training is deterministic given its config, so the finished run's
folder is copied and its ``bench.json`` records ``reused_from``. The report counts such runs.

A finished ``train`` run whose recorded TrainConfig differs from the one it would get now (the
config file changed, or a ``best-of`` sweep now picks another value) is not skipped: it is moved
to ``runs/<experiment>/.stale/`` (out of the report's reach) and run again, so that one table
never mixes two settings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.cache import atomic_write_text
from ..core.errors import SensloraError
from ..data.guard import check_input_file, check_output, path_component, writing

KINDS = ("train", "allocation-probe")
CONFIG_KEYS = ("defaults", "experiments")
EXPERIMENT_KEYS = ("name", "kind", "grid", "params", "per_method", "baseline", "also_against", "reuse_from", "headline")
RESULT_NAME = "result.json"
STALE = ".stale"  # runs/<experiment>/.stale/<run id>: finished runs whose config has changed since


@dataclass
class Run:
    """One point of an experiment's grid."""

    experiment: str
    kind: str
    params: dict[str, Any]
    grid_values: dict[str, Any]
    baseline: dict[str, Any] = field(default_factory=dict)
    also_against: list[dict[str, Any]] = field(default_factory=list)
    reuse_from: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        parts = [f"{k}={_short(v)}" for k, v in self.grid_values.items()]
        slug = re.sub(r"[^A-Za-z0-9_.=,+:-]", "_", ",".join(parts)) or "default"
        if len(slug) > 120:  # long option lists: keep the folder name short but unique
            slug = slug[:100] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:10]
        return path_component(slug, "run id", escape=True)  # e.g. no leading '.' (hidden)

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.experiment / self.run_id


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "+".join(f"{k.rsplit('.', 1)[-1]}:{_short(v)}" for k, v in sorted(value.items())) or "default"
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and check a benchmark YAML file."""
    import yaml

    try:
        p = check_input_file(path, "benchmark config")
    except SensloraError as exc:
        raise SensloraError(f"{exc}; pass a YAML file such as benchmarks/quick.yaml") from None
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SensloraError(f"benchmark config {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("experiments"), list) or not cfg["experiments"]:
        raise SensloraError(f"benchmark config {p} needs a non-empty `experiments:` list")
    _known_keys(cfg, CONFIG_KEYS, f"benchmark config {p}")
    defaults = cfg.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise SensloraError(
            f"benchmark config {p}: `defaults:` must map a kind ({', '.join(KINDS)}) to parameters"
        )
    _known_keys(defaults, KINDS, f"`defaults:` of {p}")
    for kind, params in defaults.items():
        if not isinstance(params or {}, dict):
            raise SensloraError(f"benchmark config {p}: `defaults: {kind}:` must be a mapping of parameters")
    names = set()
    for i, exp in enumerate(cfg["experiments"]):
        if not isinstance(exp, dict) or "name" not in exp:
            raise SensloraError(f"experiment #{i} in {p} needs a `name:`")
        path_component(exp["name"], f"experiment name in {p}")  # the folder runs/<name>
        _known_keys(exp, EXPERIMENT_KEYS, f"experiment {exp['name']!r} in {p}")
        for key in ("params", "baseline"):
            if not isinstance(exp.get(key) or {}, dict):
                raise SensloraError(f"experiment {exp['name']!r}: `{key}:` must be a mapping")
        also = exp.get("also_against") or []
        if not isinstance(also, list) or not all(isinstance(v, dict) and v for v in also):
            raise SensloraError(f"experiment {exp['name']!r}: `also_against:` must be a list of settings (mappings)")
        if also and not exp.get("baseline"):
            raise SensloraError(f"experiment {exp['name']!r}: `also_against:` needs a `baseline:` too")
        if exp["name"] in names:
            raise SensloraError(f"experiment name {exp['name']!r} appears twice in {p}")
        if not isinstance(exp.get("headline", True), bool):
            raise SensloraError(f"experiment {exp['name']!r}: `headline:` must be true or false")
        reuse = exp.get("reuse_from") or []
        if not isinstance(reuse, list) or not all(isinstance(v, str) and v in names for v in reuse):
            raise SensloraError(
                f"experiment {exp['name']!r}: `reuse_from:` must list names of experiments before it in {p}"
            )
        if reuse and exp.get("kind", "train") != "train":
            raise SensloraError(f"experiment {exp['name']!r}: `reuse_from:` applies to train experiments only")
        names.add(exp["name"])
        if exp.get("kind", "train") not in KINDS:
            raise SensloraError(
                f"experiment {exp['name']!r}: unknown kind {exp.get('kind')!r}; choose one of {', '.join(KINDS)}"
            )
        grid = exp.get("grid", {}) or {}
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise SensloraError(f"experiment {exp['name']!r}: `grid:` must map names to non-empty lists")
        per_method = exp.get("per_method", {}) or {}
        if not isinstance(per_method, dict) or not all(isinstance(v, dict) for v in per_method.values()):
            raise SensloraError(
                f"experiment {exp['name']!r}: `per_method:` must map method names to parameter mappings"
            )
    return cfg


def _known_keys(mapping: dict, known: tuple[str, ...], where: str) -> None:
    unknown = [str(k) for k in mapping if k not in known]
    if unknown:
        raise SensloraError(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(known)}"
        )


def check_runs(cfg: dict[str, Any], runs: list[Run]) -> None:
    """Build every run's configuration as its worker will (``train``: the TrainConfig, validated as
    :func:`senslora.training.train.train` validates it; ``allocation-probe``: the probe's keywords), so that a
    bad value fails before any run, and ``--dry-run`` fails exactly when a real run would."""
    import inspect

    from .profiling import allocation_probe

    order = [exp["name"] for exp in cfg["experiments"]]
    probe_keys = set(inspect.signature(allocation_probe).parameters)
    for run in runs:
        where = f"run {run.experiment}/{run.run_id}"
        params = {}
        for key, value in run.params.items():
            if isinstance(value, str) and value.startswith(BEST_OF):
                source = value[len(BEST_OF) :]
                if source not in order or order.index(source) >= order.index(run.experiment):
                    raise SensloraError(
                        f"{where}: {key}: {value} names no experiment before {run.experiment!r}; "
                        "name an earlier experiment of this config"
                    )
                continue  # chosen when the run starts; its type is checked then
            params[key] = value
        try:
            if run.kind == "train":
                train_config(params).validate()
            else:
                _check_probe(params, probe_keys)
        except SensloraError as exc:
            raise SensloraError(f"{where}: {exc}") from None
        except TypeError as exc:
            raise SensloraError(f"{where}: {exc}") from None


def _check_probe(params: dict[str, Any], keys: set[str]) -> None:
    unknown = sorted(set(params) - keys)
    if unknown:
        raise SensloraError(
            f"unknown allocation-probe parameter(s) {', '.join(unknown)}; use {', '.join(sorted(keys))}"
        )
    from ..core.ranges import COUNT, SEED, Range

    ranges = dict.fromkeys(("calib_samples", "batch_size", "repeats", "num_probes"), COUNT)
    ranges.update(max_length=Range(8, integer=True), seed=SEED, avg_rank=Range(0, low_open=True))
    for key, rng in ranges.items():
        if key in params:
            rng.check(key, params[key])
    for key in ("model", "calib", "estimator", "dtype"):
        if not isinstance(params.get(key, ""), str):
            raise SensloraError(f"{key} must be a string, got {params[key]!r}")


def expand(cfg: dict[str, Any]) -> list[Run]:
    """All runs of a config, in file order then grid order."""
    runs = []
    defaults = cfg.get("defaults", {}) or {}
    for exp in cfg["experiments"]:
        kind = exp.get("kind", "train")
        grid = exp.get("grid", {}) or {}
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            params = {**(defaults.get(kind) or {}), **(exp.get("params") or {})}
            for key, value in values.items():
                # A grid value that is a mapping sets several parameters at once (an ablation
                # variant, or a model with its calibration set); the key only names the axis.
                if isinstance(value, dict):
                    params.update(value)
                else:
                    params[key] = value
            # Parameters that differ by method (e.g. a learning rate tuned for that method alone);
            # they do not enter the run id, which names only the grid point.
            params.update((exp.get("per_method") or {}).get(params.get("method"), {}))
            runs.append(
                Run(
                    exp["name"],
                    kind,
                    params,
                    values,
                    exp.get("baseline") or {},
                    exp.get("also_against") or [],
                    exp.get("reuse_from") or [],
                )
            )
    return runs


def train_config(params: dict[str, Any]):
    """A TrainConfig from flat params; ``options.X`` keys (and unknown keys) become options."""
    from ..training.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = dict(params.get("options") or {})
    for key, value in params.items():
        if key == "options":
            continue
        if key.startswith("options."):
            options[key.split(".", 1)[1]] = value
        elif key in known:
            kwargs[key] = value
        else:
            raise SensloraError(f"unknown run parameter {key!r}; use a TrainConfig field or options.{key}")
    return TrainConfig(**kwargs, options=options)


def status(folder: Path) -> str | None:
    """``ok`` / ``failed`` / None (not run or unreadable) for a run folder."""
    try:
        return json.loads((folder / RESULT_NAME).read_text()).get("status")
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _die_with_parent():
    """``preexec_fn`` of a worker: on Linux the worker is killed when the bench process dies, so a
    killed ``senslora bench`` leaves no orphan run writing into a folder the next invocation reruns."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm() -> None:
        import ctypes
        import signal

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the bench process died before prctl
            os._exit(1)

    return arm


def run_one(kind: str, params: dict[str, Any], folder: Path) -> None:
    """Execute one run in this process (the worker side of :func:`run_benchmark`)."""
    if kind == "train":
        from ..training.run import resume_differences
        from ..training.train import recorded_config, train

        config = train_config(params)
        # A run interrupted mid-training left checkpoints: continue from them; a folder killed
        # before its config.json was written holds nothing to continue, and one interrupted under
        # another config (a sweep it takes best-of from has changed since) cannot be continued.
        if folder.exists() and (
            not (folder / "config.json").is_file() or resume_differences(folder, recorded_config(config))
        ):
            shutil.rmtree(folder)
        train(config, folder, resume=folder.exists(), progress=False)
    else:
        from ..core.pipeline import package_versions
        from .profiling import allocation_probe

        result = allocation_probe(**params)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(
            folder / RESULT_NAME,
            {"status": "ok", "kind": kind, "params": params, **result, "versions": package_versions()},
        )


def run_benchmark(
    config_path: str | Path,
    out: str | Path,
    *,
    only: str | None = None,
    timeout: float = 3600,
    dry_run: bool = False,
) -> dict[str, int]:
    """Run every pending run of the config; returns counts of ok / failed / skipped runs."""
    cfg = load_config(config_path)
    out = check_output(out)  # not empty, not a file, ... (before '' becomes '.')
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise SensloraError(f"--timeout must be a number of seconds >= 0 (0: no limit), got {timeout!r}")
    runs = expand(cfg)
    check_runs(cfg, runs)
    if only:
        try:
            pattern = re.compile(only)
        except re.error as exc:
            raise SensloraError(f"--only {only!r} is not a valid regular expression ({exc})") from None
        runs = [r for r in runs if pattern.search(f"{r.experiment}/{r.run_id}")]
        if not runs:
            raise SensloraError(f"--only {only!r} matches no run of {config_path}")
    with writing(out, _bench_inputs(config_path, runs)):
        return _run_all(config_path, out, runs, timeout or None, dry_run)


def _bench_inputs(config_path: str | Path, runs: list[Run]) -> list:
    from ..data.guard import data_input, model_input, task_input

    inputs: list = [("the benchmark config", Path(config_path))]
    for params in {json.dumps(r.params, sort_keys=True, default=str): r.params for r in runs}.values():
        inputs += [model_input(params.get("model")), task_input(params.get("task"))]
        if "calib" in params:
            inputs.append(data_input(params["calib"]))
    return inputs


def _run_all(config_path, out: Path, runs: list[Run], timeout: float | None, dry_run: bool) -> dict[str, int]:
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SensloraError(f"cannot create {out} ({exc.strerror}); choose another --out") from None
    try:
        atomic_write_text(out / "benchmark.yaml", Path(config_path).read_text())
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(grid_summary(runs, out), flush=True)
    counts = {"ok": 0, "failed": 0, "skipped": 0, "reused": 0, "stale": 0}
    # First set aside every finished run whose config has changed since, so that the folder never
    # holds runs of two settings side by side while the others run. A run whose best-of sweep has
    # not finished yet cannot be told now (None): it is checked again when its turn comes.
    checked: dict[Path, str] = {}
    for i, run in enumerate(runs, 1):
        folder = run.folder(out)
        if status(folder) == "ok" and (change := _config_change(run, folder, out)) is not None:
            checked[folder] = change
            if change:
                _set_aside(folder, out, f"[{i}/{len(runs)}] {run.experiment}/{run.run_id}", change, counts, dry_run)
    for i, run in enumerate(runs, 1):
        folder = run.folder(out)
        label = f"[{i}/{len(runs)}] {run.experiment}/{run.run_id}"
        meta = {
            "experiment": run.experiment,
            "kind": run.kind,
            "grid": run.grid_values,
            "params": run.params,
            "baseline": run.baseline,
            "also_against": run.also_against,
        }
        if status(folder) == "ok" and folder not in checked:  # its sweep finished during this invocation
            if change := _config_change(run, folder, out):
                _set_aside(folder, out, label, change, counts, dry_run)
        if status(folder) == "ok" and not (dry_run and checked.get(folder)):
            counts["skipped"] += 1
            if not (folder / "bench.json").is_file():  # killed between the run's end and bench.json
                _write_json(folder / "bench.json", meta)
            continue
        if dry_run:
            try:
                source = reusable_run(run, resolve_params(run.params, out), out) if run.reuse_from else None
            except SensloraError:  # a sweep it depends on has not finished: it cannot be matched yet
                source = None
            print(f"{label}: would reuse {source.parent.name}/{source.name}" if source else f"{label}: would run")
            continue
        print(f"{label} ...", flush=True)
        start = time.perf_counter()
        if status(folder) == "failed":  # a failed attempt is retried from scratch
            shutil.rmtree(folder)
        try:
            params = resolve_params(run.params, out)
        except SensloraError as exc:
            counts["failed"] += 1
            print(f"{label}: FAILED: {exc}", flush=True)
            continue
        source = reusable_run(run, params, out)
        if source is not None:
            _copy_run(source, folder, {**meta, "reused_from": f"{source.parent.name}/{source.name}"})
            counts["reused"] += 1
            print(f"{label}: reused {source.parent.name}/{source.name} (identical config)", flush=True)
            continue
        spec = json.dumps({"kind": run.kind, "params": params, "folder": str(folder)})
        error = _run_worker(spec, timeout)
        seconds = time.perf_counter() - start
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "bench.json", meta)  # which experiment and grid point, for the report
        if error is None and status(folder) == "ok":
            counts["ok"] += 1
            print(f"{label}: ok in {seconds:.0f} s", flush=True)
        else:
            counts["failed"] += 1
            _write_json(
                folder / RESULT_NAME,
                {
                    **meta,
                    "status": "failed",
                    "error": error or "the run wrote no ok result.json",
                    "seconds": seconds,
                },
            )
            print(f"{label}: FAILED: {error}", flush=True)
    return counts


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def measured_seconds(out: Path) -> list[float]:
    """The wall times of the finished train runs under ``out`` (their ``result.json``)."""
    times = []
    for path in out.glob(f"runs/*/*/{RESULT_NAME}"):
        try:
            seconds = json.loads(path.read_text()).get("wall_time_s")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:
            times.append(float(seconds))
    return times


def grid_summary(runs: list[Run], out: Path) -> str:
    """Said before the first run: how many runs the grid has, how many are left, and how long the
    finished runs under ``out`` suggest the rest takes (one run at a time)."""
    pending = sum(status(run.folder(out)) != "ok" for run in runs)
    line = f"{len(runs)} runs, {len(runs) - pending} already done, {pending} to run"
    times = measured_seconds(out)
    if pending and times:
        each = statistics.median(times)
        line += (
            f"; the {len(times)} finished runs took {_duration(each)} each (median), so about "
            f"{_duration(each * pending)} for the rest"
        )
    elif pending:
        line += " (no finished run to estimate the time from yet)"
    return line


BEST_OF = "best-of:"


def resolve_params(params: dict[str, Any], out: Path) -> dict[str, Any]:
    """Replace ``KEY: "best-of:EXPERIMENT"`` by the KEY value that won EXPERIMENT on validation.

    The winner maximises the mean over seeds of the final-epoch *validation* value of the runs'
    primary metric (the test split is never used to choose), so e.g. the learning rate of the
    uniform-LoRA baseline is tuned by a sweep that ran earlier in the same benchmark.
    """
    resolved = dict(params)
    for key, value in params.items():
        if not (isinstance(value, str) and value.startswith(BEST_OF)):
            continue
        experiment = value[len(BEST_OF) :]
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
        best = max(scores, key=lambda v: (sum(scores[v]) / len(scores[v]), v))
        resolved[key] = json.loads(best)
    return resolved


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
        before = json.loads((folder / RESULT_NAME).read_text()).get("config")
    except (SensloraError, OSError, ValueError):
        return None
    if not isinstance(before, dict):
        return None
    keys = sorted(k for k in set(now) & set(before) if now[k] != before[k])
    return ", ".join(f"{k} {before[k]!r} (now {now[k]!r})" for k in keys)


def _config_record(params: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig of resolved ``params`` as a run records it in result.json (JSON types, the
    method's implied options added)."""
    from ..training.train import recorded_config

    return json.loads(json.dumps(recorded_config(train_config(params)).to_dict(), default=str))


def reusable_run(run: Run, params: dict[str, Any], out: Path) -> Path | None:
    """The folder of an ok run in ``run.reuse_from`` whose resolved TrainConfig equals this run's
    (``params`` already resolved), or None. The first match in sorted folder order wins."""
    if run.kind != "train" or not run.reuse_from:
        return None
    wanted = _config_record(params)
    for experiment in run.reuse_from:
        for result_path in sorted((out / "runs" / experiment).glob(f"*/{RESULT_NAME}")):
            try:
                result = json.loads(result_path.read_text())
            except (OSError, ValueError):
                continue
            if result.get("status") == "ok" and _same_config(result.get("config"), wanted):
                return result_path.parent
    return None


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
    _write_json(tmp / "bench.json", meta)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def _run_worker(spec: str, timeout: float | None) -> str | None:
    """Run one worker process; its error line, or None. On Ctrl-C / SIGTERM the worker gets SIGTERM
    too and is waited for, so that it removes its temporary folders and keeps its checkpoints."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "senslora.bench.harness", spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent(),
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return f"timed out after {timeout:g} s"
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except BaseException:
            proc.kill()
            proc.wait()
        raise
    return None if proc.returncode == 0 else _last_line(stderr or stdout)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _worker(spec: str) -> int:
    from ..core.errors import Terminated, foreign_error, raise_on_sigterm

    data = json.loads(spec)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    raise_on_sigterm()
    try:
        run_one(data["kind"], data["params"], Path(data["folder"]))
    except Terminated:
        print("senslora: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except SensloraError as exc:
        print(f"senslora: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a library's or the OS's: one line (the run's FAILED reason)
        line = foreign_error(exc, f"run {data['folder']}")
        if line is None:
            raise
        if os.environ.get("SENSLORA_DEBUG", "") not in ("", "0"):
            import traceback

            traceback.print_exc()
        print(f"senslora: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
