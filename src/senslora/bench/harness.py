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
        target_half_width: 0.015                  # report: whether every paired 95% interval is
                                                  # at most this wide (the seeds it was sized for)

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
parameter that maximised the validation metric in EXPERIMENT (e.g. a learning-rate sweep);
``{KEY}`` in EXPERIMENT is filled from the run's own parameters (``"best-of:val-r{avg_rank}"``: each
budget of a grid over ``avg_rank`` takes the rate of its own sweep).

``reuse_from`` lists earlier experiments of the same config. A ``train`` run whose resolved
:class:`~senslora.training.config.TrainConfig` (after ``best-of``) equals that of an ok run of one
of them is not trained again: training is deterministic given its config, so the finished run's
folder is copied and its ``bench.json`` records ``reused_from``. The report counts such runs.

A finished ``train`` run whose recorded TrainConfig differs from the one it would get now (the
config file changed, or a ``best-of`` sweep now picks another value) is not skipped: it is moved
to ``runs/<experiment>/.stale/`` (out of the report's reach) and run again, so that one table
never mixes two settings. Nor does it mix library versions: a run is copied only from one made on
the same torch / transformers / peft / accelerate, and a benchmark that would add runs to an
experiment whose finished runs recorded other versions stops before its first run
(``scripts/constraints.txt`` pins the versions the committed runs used).

Layout: :mod:`.grid` reads the config and expands it into runs, :mod:`.reuse` decides what a run
takes from finished ones (``best-of``, ``reuse_from``, stale runs); this module runs them, one
worker process each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..core.cache import atomic_write_text
from ..core.errors import SensloraError
from ..data.guard import check_output, writing

# Re-exported: the config and reuse steps live in .grid and .reuse; callers and tests import them here.
from .grid import (
    BEST_OF,
    CONFIG_KEYS,
    EXPERIMENT_KEYS,
    KINDS,
    RESULT_NAME,
    Run,
    check_runs,
    expand,
    load_config,
    run_name,
    train_config,
)
from .reuse import (
    _config_change,
    _copy_run,
    _set_aside,
    check_one_version,
    library_versions,
    resolve_params,
    reusable_run,
    write_json,
)

__all__ = [
    "BEST_OF", "CONFIG_KEYS", "EXPERIMENT_KEYS", "KINDS", "RESULT_NAME", "Run", "check_runs", "expand",
    "load_config", "train_config", "resolve_params", "reusable_run", "run_benchmark", "run_one", "status",
    "grid_summary", "measured_seconds",
]  # fmt: skip


def status(folder: Path) -> str | None:
    """``ok`` / ``failed`` / None (not run or unreadable) for a run folder."""
    try:
        return json.loads((folder / RESULT_NAME).read_text()).get("status")
    except (OSError, ValueError):
        return None


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
        write_json(
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
    check_one_version({r.experiment for r in runs if status(r.folder(out)) != "ok"}, out, library_versions())
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
                write_json(folder / "bench.json", meta)
            continue
        if dry_run:
            try:
                source = reusable_run(run, resolve_params(run.params, out), out) if run.reuse_from else None
            except SensloraError:  # a sweep it depends on has not finished: it cannot be matched yet
                source = None
            print(f"{label}: would reuse {run_name(source)}" if source else f"{label}: would run")
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
            _copy_run(source, folder, {**meta, "reused_from": run_name(source)})
            counts["reused"] += 1
            print(f"{label}: reused {run_name(source)} (identical config)", flush=True)
            continue
        spec = json.dumps({"kind": run.kind, "params": params, "folder": str(folder)})
        error = _run_worker(spec, timeout)
        seconds = time.perf_counter() - start
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "bench.json", meta)  # which experiment and grid point, for the report
        if error is None and status(folder) == "ok":
            counts["ok"] += 1
            print(f"{label}: ok in {seconds:.0f} s", flush=True)
        else:
            counts["failed"] += 1
            write_json(
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


def measured_seconds(out: Path) -> list[tuple[str, str | None, float]]:
    """The finished train runs under ``out`` (their ``result.json``): ``(experiment, model, wall
    time in seconds)`` each."""
    times = []
    for path in out.glob(f"runs/*/*/{RESULT_NAME}"):
        try:
            result = json.loads(path.read_text())
            seconds, model = result.get("wall_time_s"), result.get("model")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:
            times.append((path.parent.parent.name, model if isinstance(model, str) else None, float(seconds)))
    return times


def _expected_seconds(pending: list[Run], times: list[tuple[str, str | None, float]]) -> float:
    """The pending runs' total time: each run the median of the finished runs of its experiment,
    else of those of its model (a decoder run takes several times an encoder run), else of all."""
    by_experiment: dict[str, list[float]] = {}
    by_model: dict[str | None, list[float]] = {}
    for experiment, model, seconds in times:
        by_experiment.setdefault(experiment, []).append(seconds)
        by_model.setdefault(model, []).append(seconds)
    experiment_median = {k: statistics.median(v) for k, v in by_experiment.items()}
    model_median = {k: statistics.median(v) for k, v in by_model.items()}
    overall = statistics.median(s for _, _, s in times)
    return sum(
        experiment_median.get(run.experiment, model_median.get(run.params.get("model"), overall)) for run in pending
    )


def grid_summary(runs: list[Run], out: Path) -> str:
    """Said before the first run: how many runs the grid has, how many are left, and how long the
    finished runs under ``out`` suggest the rest takes (one run at a time), each pending run
    estimated from the finished runs of its experiment, else of its model, else of all."""
    pending = [run for run in runs if status(run.folder(out)) != "ok"]
    line = f"{len(runs)} runs, {len(runs) - len(pending)} already done, {len(pending)} to run"
    times = measured_seconds(out)
    if pending and times:
        line += (
            f"; the {len(times)} finished runs took {_duration(statistics.median(s for _, _, s in times))} "
            f"each (median); by the finished runs of the same experiment, else model, about "
            f"{_duration(_expected_seconds(pending, times))} for the rest"
        )
    elif pending:
        line += " (no finished run to estimate the time from yet)"
    return line


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
