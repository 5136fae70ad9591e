"""A benchmark config (YAML) -> its runs: reading and checking the file, expanding every
experiment's grid into :class:`Run` s, and each run's :class:`~senslora.training.config.TrainConfig`
(see :mod:`senslora.bench.harness` for the format)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.errors import SensloraError
from ..data.guard import check_input_file, path_component

KINDS = ("train", "allocation-probe")
CONFIG_KEYS = ("defaults", "experiments")
EXPERIMENT_KEYS = ("name", "kind", "grid", "params", "per_method", "baseline", "also_against", "reuse_from", "headline",
                  "target_half_width")
BEST_OF = "best-of:"  # a value taken from the winner of a validation sweep (reuse.resolve_params)
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
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


def run_name(folder: Path) -> str:
    """``experiment/grid point`` of a run folder: how ``reused_from`` names the run it copied."""
    return f"{folder.parent.name}/{folder.name}"


def best_of_source(value: str, params: dict[str, Any]) -> str:
    """The experiment a ``"best-of:EXPERIMENT"`` value names, its ``{KEY}`` placeholders filled from
    the run's own parameters: ``best-of:val-r{avg_rank}`` in a run with ``avg_rank: 2`` names
    ``val-r2``, so one grid can take each budget's rate from that budget's own sweep."""

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key not in params or isinstance(params[key], (dict, list)):
            raise SensloraError(
                f"{value}: the placeholder {{{key}}} names no plain parameter of this run; "
                "use a key the run sets (e.g. {avg_rank})"
            )
        return _short(params[key])

    return _PLACEHOLDER.sub(fill, value[len(BEST_OF) :])


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
        target = exp.get("target_half_width")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0):
            raise SensloraError(
                f"experiment {exp['name']!r}: `target_half_width:` must be a positive number (e.g. 0.015), got {target!r}"
            )
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
                try:
                    source = best_of_source(value, run.params)
                except SensloraError as exc:
                    raise SensloraError(f"{where}: {key}: {exc}") from None
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
