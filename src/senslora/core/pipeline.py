"""The Sensitivity-LoRA pipeline: model + calibration batches -> per-matrix ranks (METHOD.md section 1).

``allocate`` runs steps 1-5 (targets, Hessian diagonals, metrics, fusion, integer ranks) and
returns an :class:`Allocation`, which turns into a PEFT ``LoraConfig`` (step 6 is ordinary LoRA
training) and saves to / loads from a folder.

Under a launcher with several processes (``accelerate launch`` / ``torchrun``) every process calls
``allocate`` with the same model and batches: the estimation is sharded over the processes (see
:mod:`senslora.core.estimators`), every process computes the same ranks from the reduced diagonals, and
the main process's :class:`Allocation` (its timings) is broadcast so all return the same object.
:meth:`Allocation.save` writes on the main process only.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .. import __version__
from .allocation import STRATEGIES as STRATEGIES  # re-exported: part of this module's API
from .allocation import allocate_params, allocate_ranks
from .config import BUDGET_MODES as BUDGET_MODES  # re-exported: flags and options read it here
from .config import AllocationConfig
from .distributed import SINGLE, current
from .errors import SensloraError, SensloraWarning
from .inits import DEFAULT_STEP, gradient_sketch, init_blocker, new_sketch
from .losses import input_device
from .metrics import MatrixScores, fuse, score_matrix
from .peft_bridge import ranks_to_lora_config
from .presets import DEFAULT_PRESET, preset_init, recipe_name
from .shaping import (
    concentration,
    concentration_warning,
    normalize_by_role,
    rank_cap,
    temper,
)
from .sketch import GradientSketch
from .targets import find_targets, quantization
from .timing import sync_device, time_forward

ADAPTER_DIR = "adapter"

# The single metrics of the paper's Figure 3, plus the fused allocation.
FIGURE3_SCORES = ("global", "topk", "effective-rank", "fused")


@dataclass
class MatrixAllocation:
    """Scores and rank of one target matrix."""

    name: str
    shape: tuple[int, int]  # (d_out, d_in)
    layer: int | None
    s_global: float
    s_topk: float
    s_eff: float
    theta: float
    rank: int
    params: int  # trainable LoRA parameters: rank * (d_in + d_out)
    ranks_by_score: dict[str, int] = field(default_factory=dict)  # Figure 3: rank under each single score
    clamped: int = 0  # negative Hutchinson entries clamped to 0


@dataclass
class Allocation:
    """The result of :func:`allocate`; everything ``allocation.json`` holds."""

    matrices: list[MatrixAllocation]
    avg_rank: float
    total_rank: int
    budget_mode: str
    trainable_params: int
    uniform_params: int  # trainable LoRA parameters of uniform rank avg_rank on the same matrices
    estimator: str
    score: str
    fusion: str
    strategy: str
    categories: int
    topk_fraction: float
    alpha: float
    r_min: int
    r_max: int | None
    weights: dict[str, float]
    lora_alpha: float
    alpha_mode: str
    calibration: dict = field(default_factory=dict)  # examples, batches, tokens, source
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    seed: int = 0
    model: str = ""
    #: How the model held the target weights: "4bit" / "8bit" (bitsandbytes, QLoRA), "" for floats.
    quantized: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    # The recipe (presets.py); the defaults are the paper's, so older allocation.json files load.
    preset: str = "paper"
    recipe: str = "paper"
    sink: str = "keep"
    token_trim: float = 0.0
    saliency: str = "hessian"
    temperature: float = 1.0
    normalize: str = "none"
    rho: float | None = 0
    rank_cap: int | None = None  # floor(rho x avg_rank) when rho is set
    concentration: dict[str, float] = field(default_factory=dict)
    # The adapter initialisation (inits.py); "zero" for files written before it existed.
    init: str = "zero"
    init_step: float = DEFAULT_STEP
    init_pass: str = ""  # gradient: "shared" with the fisher pass, or "extra" (one more pass)
    # Why the preset's init could not run and ``init`` is "zero" instead ("" when it ran).
    init_fallback: str = ""
    format_version: int = 2
    #: The filled gradient sketch of ``init="gradient"`` (not saved: :meth:`to_peft_model`
    #: recomputes it from the calibration batches when it is missing, e.g. after :meth:`load`).
    sketch: GradientSketch | None = field(default=None, repr=False, compare=False, metadata={"saved": False})

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.matrices}

    def to_lora_config(self, base=None):
        """A ``peft.LoraConfig`` with every matrix at its allocated rank.

        ``base`` supplies every other field (task_type, dropout, ...); by default
        ``LoraConfig(r=round(avg_rank), lora_alpha=self.lora_alpha)``. Alpha follows ``alpha_mode``
        relative to ``base.lora_alpha / base.r``.
        """
        from peft import LoraConfig

        if base is None:
            base = LoraConfig(r=max(1, round(self.avg_rank)), lora_alpha=self.lora_alpha)
        return ranks_to_lora_config(self.ranks, base, alpha_mode=self.alpha_mode)

    def to_peft_model(self, model, base=None, *, batches=(), loss_fn=None, device=None, record=None):
        """``model`` wrapped by PEFT at the allocated ranks, its adapter initialised by ``init``
        (:func:`senslora.core.inits.init_peft_model`). ``batches``: the calibration batches, for the
        data-driven inits (``gradient`` reuses the sketch of :func:`allocate` when it has one)."""
        from .inits import init_peft_model

        return init_peft_model(
            model,
            self.to_lora_config(base),
            self.init,
            batches=batches,
            sketch=self.sketch,
            step=self.init_step,
            loss_fn=loss_fn,
            device=device,
            seed=self.seed,
            record=record,
        )

    def to_dict(self) -> dict:
        out = asdict(replace(self, sketch=None))
        out.pop("sketch")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Allocation:
        data = dict(data)
        data.pop("sketch", None)
        data["matrices"] = [MatrixAllocation(**{**m, "shape": tuple(m["shape"])}) for m in data["matrices"]]
        return cls(**data)

    def save(
        self,
        out_dir: str | Path,
        *,
        plot: bool = True,
        base_config=None,
        overwrite: bool = False,
        peft_model=None,
        adapter_dir: str | Path | None = None,
        adapter_weights: bool = False,
        files: dict[str, str] | None = None,
    ) -> Path:
        """Write ``allocation.json``, ``lora_config/adapter_config.json`` and ``ranks.png`` atomically;
        with ``adapter_dir`` (where the PEFT adapter of this allocation is saved) also
        ``axolotl.yaml`` and ``llamafactory.yaml`` pointing at it (:mod:`senslora.core.exports`;
        ``adapter_weights``: its weights matter, so axolotl must load them). ``files``: more text
        files to write into the folder (name -> text), e.g. the config ``allocate`` ran with.
        ``peft_model`` (from :meth:`to_peft_model`): also ``adapter/``, its initialised adapter (PEFT
        ``save_pretrained``).

        With several processes only the main one writes; the others return at once (call a barrier
        before another process reads the folder).
        """
        from .cache import atomic_dir

        out = Path(out_dir)
        if not current().is_main:
            return out
        if out.exists() and not overwrite:
            raise SensloraError(f"output folder {out} already exists; remove it or pass --overwrite")
        with atomic_dir(out) as tmp:
            (tmp / "allocation.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            self.to_lora_config(base_config).save_pretrained(str(tmp / "lora_config"))
            if peft_model is not None:
                peft_model.save_pretrained(str(tmp / ADAPTER_DIR))
            if adapter_dir is not None:
                from .exports import write_exports

                write_exports(tmp, self, adapter_dir, base_config=base_config, weights=adapter_weights)
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
            if plot:
                from .plot import plot_ranks

                plot_ranks(self, tmp / "ranks.png")
        return out

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        """Read an allocation folder (or its ``allocation.json``)."""
        from .cache import load_json_record

        return load_json_record(
            path,
            "allocation.json",
            cls.from_dict,
            missing="pass a folder written by `senslora allocate`",
            invalid="rerun `senslora allocate`",
        )


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, plus the git revision when available."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "senslora": __version__}
    for pkg in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        if rev.returncode == 0:
            out["git"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _count_tokens(batches: Sequence[dict]) -> int:
    return int(
        sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            for b in batches
        )
    )


def _ranks_for(
    theta, *, total, budget_mode, param_budget, costs, strategy, categories, r_min, r_max
) -> np.ndarray:
    if budget_mode == "params":
        if strategy != "sra":
            raise SensloraError("--budget params works with --strategy sra only")
        return allocate_params(theta, param_budget, costs, r_min=r_min, r_max=r_max)
    return allocate_ranks(theta, total, strategy=strategy, r_min=r_min, r_max=r_max, categories=categories)


def _shape_theta(theta, names, costs, *, budget_mode, temperature, normalize) -> np.ndarray:
    """θ after the recipe's tempering and role normalisation (identity for the paper's recipe).

    With role normalisation under a parameter budget, θ is multiplied by each matrix's cost per
    rank, so that the *ranks* (not the parameters) follow θ relative to the role's mean.
    """
    out = temper(theta, temperature) if temperature != 1 else np.asarray(theta, dtype=np.float64)
    if normalize == "role":
        out = normalize_by_role(out, names)
        if budget_mode == "params":
            out = out * costs / costs.mean()
    return out


def _weight_of(target) -> torch.Tensor:
    from .targets import _is_conv1d

    w = target.module.weight
    if w.device.type == "meta":
        raise SensloraError(
            f"--saliency obd needs the weights, and {target.name} is offloaded; "
            "load the model without --device-map cpu/disk or use --saliency hessian"
        )
    if target.quantized:
        raise SensloraError(
            f"--saliency obd needs the weights, and {target.name} is quantised ({w.dtype}); "
            "use --saliency hessian"
        )
    return w.T if _is_conv1d(target.module) else w


class _Budget(NamedTuple):
    """Step 1's numbers: per-matrix rank caps and costs, and the budget they share."""

    caps: np.ndarray  # largest rank per matrix (shape, r_max, the rho cap)
    cap: int | None  # floor(rho x avg_rank) when rho is set
    costs: np.ndarray  # LoRA parameters per rank of each matrix
    total: int  # rank budget
    uniform_params: int  # parameter budget: uniform LoRA of rank avg_rank


_CONFIG_FIELDS = tuple(f.name for f in fields(AllocationConfig))


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))  # ["q"] is ("q",)
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. arrays
        return False


def _config_from(config: AllocationConfig | None, keywords: dict) -> AllocationConfig:
    """The validated config of one call: built from the keywords, or a copy of ``config``; a keyword
    that is not at its default and disagrees with ``config`` is an error."""
    if config is None:
        return AllocationConfig(**keywords)
    defaults = {f.name: f.default for f in fields(AllocationConfig)}
    for name, value in keywords.items():
        if not _same(value, defaults[name]) and not _same(value, getattr(config, name)):
            raise SensloraError(
                f"allocate() got config with {name}={getattr(config, name)!r} and the keyword "
                f"{name}={value!r}; set {name} in one place"
            )
    copy = replace(config)  # validated again: the caller may have changed fields since
    # Still the preset's init only if no one set another init or preset on the config since.
    copy.init_from_preset = config.init_from_preset and config.init == preset_init(config.preset)
    return copy


def _runnable_init(config: AllocationConfig, model, batches, loss_fn) -> tuple[AllocationConfig, str]:
    """(the config whose init runs here, why the preset's init could not: "" when it can). The
    preset's own init (not given) falls back to ``zero`` with a warning where it cannot run
    (:func:`senslora.core.inits.init_blocker`); an init the caller named is an error there."""
    reason = init_blocker(config.init, model, batches, loss_fn)
    if reason is None:
        return config, ""
    if not config.init_from_preset:
        raise SensloraError(f"--init {config.init} cannot run: {reason}; fix that or use --init zero")
    warnings.warn(
        f"the {config.preset or DEFAULT_PRESET} preset's --init {config.init} cannot run: {reason}; "
        "using --init zero (PEFT's) instead, recorded as init_fallback in allocation.json",
        SensloraWarning,
        stacklevel=3,
    )
    return replace(config, init="zero"), reason


def _budget(config: AllocationConfig, rho, targets) -> _Budget:
    """Step 1: the rank caps and the budget of the target matrices."""
    caps = np.array([min(t.shape) for t in targets], dtype=np.int64)
    if config.r_max is not None:
        caps = np.minimum(caps, config.r_max)
    cap = rank_cap(config.avg_rank, rho)
    if cap is not None:
        caps = np.minimum(caps, cap)
    if config.avg_rank > caps.min():
        raise SensloraError(
            f"--avg-rank {config.avg_rank} is above the largest rank ({int(caps.min())}) the smallest target matrix allows; lower --avg-rank"
        )
    costs = np.array([t.lora_params_per_rank for t in targets], dtype=np.int64)
    total = int(round(config.avg_rank * len(targets)))
    return _Budget(caps, cap, costs, total, int(round(config.avg_rank * costs.sum())))


def _reference_forward(model, batches, device, dist, *, progress) -> dict[str, float]:
    """The reference cost: one plain forward pass over the same batches (after one warm-up batch,
    so neither measurement pays the one-off start-up cost); with several processes, over this
    process's shard, the batches its estimator will see."""
    local = dist.shard(batches) if dist.enabled else batches
    if not local:
        return {}
    time_forward(model, local[:1], device)
    return {"forward": time_forward(model, local, device, progress=progress and dist.is_main)}


def _estimate(model, batches, targets, config, recipe, *, device, sketch=None, **run) -> dict:
    """Step 2: the Hessian diagonal of every target matrix (times w^2 for the OBD saliency);
    ``sketch``: also fill this gradient sketch in the same pass (``fisher`` only)."""
    from .diagonal import weight_saliency
    from .estimators import estimate_diagonals

    estimator = recipe["estimator"]
    diagonals = estimate_diagonals(
        estimator,
        model,
        batches,
        targets,
        device=device,
        seed=config.seed,
        num_probes=config.num_probes,
        **run,
        **({"sink": recipe["sink"], "token_trim": recipe["token_trim"]} if estimator == "activation" else {}),
        **({"sketch": sketch} if sketch is not None else {}),
    )
    if recipe["saliency"] == "obd":
        diagonals = {t.name: weight_saliency(diagonals[t.name], _weight_of(t)) for t in targets}
    sync_device(device)
    return diagonals


def _shared_sketch(config, recipe, budget: _Budget, targets, device, accumulate_on) -> GradientSketch | None:
    """The gradient sketch the ``fisher`` pass fills for ``init="gradient"``, or None (another init,
    another estimator, or no rank cap: ``A`` would need up to min(d_in, d_out) rows, a
    gradient-sized sketch, so the sketch waits for the ranks and takes one more pass)."""
    capped = budget.cap is not None or config.r_max is not None
    if config.init != "gradient" or recipe["estimator"] != "fisher" or not capped:
        return None
    rows = {t.name: int(c) for t, c in zip(targets, budget.caps, strict=True)}
    return new_sketch(targets, rows, config.seed, accumulate_on, device)


def _ranks_by(scores, score, config, recipe, names, budget: _Budget):
    """Steps 4-5 for one ``score``: fused θ, shaped by the recipe, turned into integer ranks."""
    theta, weights = fuse(scores, fusion=recipe["fusion"], score=score)
    theta = _shape_theta(
        theta,
        names,
        budget.costs,
        budget_mode=config.budget_mode,
        temperature=recipe["temperature"],
        normalize=recipe["normalize"],
    )
    ranks = _ranks_for(
        theta,
        total=budget.total,
        budget_mode=config.budget_mode,
        param_budget=budget.uniform_params,
        costs=budget.costs,
        strategy=recipe["strategy"],
        categories=config.categories,
        r_min=config.r_min,
        r_max=budget.caps,
    )
    return theta, weights, ranks


def _figure3(scores, config, recipe, names, budget) -> dict[str, np.ndarray]:
    """What each single metric would allocate under the same budget (the paper's Figure 3)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {s: _ranks_by(scores, s, config, recipe, names, budget)[2] for s in FIGURE3_SCORES}


def _matrices(targets, scores, theta, ranks, by_score, diagonals) -> list[MatrixAllocation]:
    return [
        MatrixAllocation(
            name=t.name,
            shape=t.shape,
            layer=t.layer,
            s_global=float(sc.s_global),
            s_topk=float(sc.s_topk),
            s_eff=float(sc.s_eff),
            theta=float(th),
            rank=int(r),
            params=int(r) * int(t.lora_params_per_rank),
            ranks_by_score={s: int(v[i]) for s, v in by_score.items()},
            clamped=int(diagonals[t.name].clamped),
        )
        for i, (t, sc, th, r) in enumerate(zip(targets, scores, theta, ranks, strict=True))
    ]


def _record(config, recipe, matrices, ranks, weights, budget, batches, timings, model_name) -> Allocation:
    """Step 6's input: the :class:`Allocation` with the recipe, budget and calibration it came from."""
    lora_alpha = 2.0 * config.avg_rank if config.lora_alpha is None else config.lora_alpha
    return Allocation(
        matrices=matrices,
        avg_rank=float(config.avg_rank),
        total_rank=int(ranks.sum()),
        budget_mode=config.budget_mode,
        trainable_params=int(sum(m.params for m in matrices)),
        uniform_params=budget.uniform_params,
        estimator=recipe["estimator"],
        score=recipe["score"],
        fusion=recipe["fusion"],
        strategy=recipe["strategy"],
        categories=config.categories,
        topk_fraction=recipe["topk_fraction"],
        alpha=recipe["alpha"],
        r_min=config.r_min,
        r_max=config.r_max,
        weights={k: float(v) for k, v in weights.items()},
        lora_alpha=float(lora_alpha),
        alpha_mode=config.alpha_mode,
        calibration={
            "batches": len(batches),
            "examples": int(sum(len(b["input_ids"]) for b in batches)),
            "tokens": _count_tokens(batches),
        },
        timings=timings,
        seed=config.seed,
        model=model_name,
        versions=package_versions(),
        preset=DEFAULT_PRESET if config.preset is None else config.preset,
        recipe=recipe_name(config.preset, recipe),
        sink=recipe["sink"],
        token_trim=float(recipe["token_trim"]),
        saliency=recipe["saliency"],
        temperature=float(recipe["temperature"]),
        normalize=recipe["normalize"],
        rho=recipe["rho"],
        rank_cap=budget.cap,
        concentration=concentration(ranks, [m.params for m in matrices], config.r_min, budget.caps),
        init=config.init,
        init_step=float(config.init_step),
    )


def allocate(
    model,
    calibration_batches: Iterable[dict],
    *,
    config: AllocationConfig | None = None,
    avg_rank: float = 4,
    preset: str | None = None,
    estimator: str | None = None,
    sink: str | None = None,
    token_trim: float | None = None,
    saliency: str | None = None,
    score: str | None = None,
    fusion: str | None = None,
    strategy: str | None = None,
    categories: int = 3,
    topk_fraction: float | None = None,
    alpha: float | None = None,
    temperature: float | None = None,
    normalize: str | None = None,
    rho: float | None = None,
    r_min: int = 1,
    r_max: int | None = None,
    budget_mode: str = "rank",
    target_modules: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    lora_alpha: float | None = None,
    alpha_mode: str = "proportional",
    seed: int = 0,
    device=None,
    accumulate_on: str = "cpu",
    num_probes: int = 1,
    loss_fn=None,
    progress: bool = True,
    measure_forward: bool = False,
    model_name: str = "",
    distributed: bool | None = None,
    init: str | None = None,
    init_step: float = DEFAULT_STEP,
) -> Allocation:
    """Allocate per-matrix LoRA ranks from Hessian-diagonal sensitivity (paper sections 3-4).

    The recipe and budget are an :class:`~senslora.core.config.AllocationConfig` (its docstring
    describes every field): pass one as ``config``, or its fields as keywords (both at once only
    where they agree). Every recipe field left at None takes the ``preset``'s value.

    Args:
        model: any torch / HF model; it is not modified (hooks are removed, modes restored).
        calibration_batches: dicts of tensors (``input_ids``, ``attention_mask``, and ``labels`` for
            the ``fisher`` / ``hutchinson`` estimators), e.g. from :func:`senslora.data.examples.make_batches`.
        config: the recipe and budget; a keyword that is not at its default must agree with it.
        device, accumulate_on, loss_fn, progress: where and how the estimator runs (see
            :func:`senslora.core.estimators.estimate_diagonals`).
        measure_forward: also time one plain forward pass over the same batches first (the
            reference cost; ``timings["forward"]`` and ``timings["ratio_to_forward"]``). Off by
            default: it doubles what the user waits for; the benchmark's probes turn it on.
        model_name: recorded in the :class:`Allocation`.
        distributed: ``None`` (default): with several processes, shard the calibration batches and
            the forward-pass reference over them (every process must call ``allocate`` with the
            same batches); ``False``: this process does everything alone.
        init, init_step: the adapter initialisation (config fields; ``init`` None: the preset's,
            which falls back to ``zero`` with a warning where it cannot run, e.g. on batches
            without labels; a given ``init`` that cannot run is an error). ``gradient`` fills the
            gradient sketch here: in the ``fisher`` estimator's pass when every rank is capped
            (``rho`` or ``r_max``), else in one more forward and backward pass at the allocated
            ranks; :meth:`Allocation.to_peft_model` then builds the initialised adapter.
    """
    given = locals()
    config = _config_from(config, {name: given[name] for name in _CONFIG_FIELDS})
    recipe = config.recipe()

    targets = find_targets(model, config.target_modules, config.layers)  # step 1
    budget = _budget(config, recipe["rho"], targets)
    batches = list(calibration_batches)
    if not batches:
        raise SensloraError("the calibration set is empty; pass --calib with at least one example")
    config, fallback = _runnable_init(config, model, batches, loss_fn)
    timings: dict[str, float] = {}
    device = device or input_device(model)
    dist = current() if distributed is not False else SINGLE

    if measure_forward:
        timings.update(_reference_forward(model, batches, device, dist, progress=progress))

    start = time.perf_counter()  # step 2
    run = dict(loss_fn=loss_fn, accumulate_on=accumulate_on, progress=progress, distributed=distributed)
    shared = _shared_sketch(config, recipe, budget, targets, device, accumulate_on)
    diagonals = _estimate(model, batches, targets, config, recipe, device=device, sketch=shared, **run)
    timings["estimation"] = time.perf_counter() - start

    start = time.perf_counter()  # step 3: the three metrics per matrix
    fraction, alpha = recipe["topk_fraction"], recipe["alpha"]
    scores: list[MatrixScores] = [score_matrix(diagonals[t.name], fraction, alpha) for t in targets]
    timings["metrics"] = time.perf_counter() - start

    start = time.perf_counter()  # steps 4-5: fuse into θ, shape it, integer ranks
    names = [t.name for t in targets]
    theta, weights, ranks = _ranks_by(scores, recipe["score"], config, recipe, names, budget)
    timings["allocation"] = time.perf_counter() - start
    sketch, init_pass = shared, "shared" if shared is not None else ""
    if config.init == "gradient" and shared is None:  # one more forward and backward pass
        start = time.perf_counter()
        rank_of = {t.name: int(r) for t, r in zip(targets, ranks, strict=True)}
        sketch = gradient_sketch(model, batches, targets, rank_of, seed=config.seed, device=device, **run)
        sync_device(device)
        timings["init"], init_pass = time.perf_counter() - start, "extra"
    timings["total"] = timings["estimation"] + timings["metrics"] + timings["allocation"] + timings.get("init", 0.0)
    if "forward" in timings and timings["forward"] > 0:
        timings["ratio_to_forward"] = timings["total"] / timings["forward"]

    by_score = _figure3(scores, config, recipe, names, budget)
    matrices = _matrices(targets, scores, theta, ranks, by_score, diagonals)
    alloc = _record(config, recipe, matrices, ranks, weights, budget, batches, timings, model_name)
    if shared is not None:  # the Fisher pass saw every calibration example (summed over processes)
        shared.num_examples = alloc.calibration["examples"]
    alloc.sketch, alloc.init_pass, alloc.init_fallback = sketch, init_pass, fallback
    alloc.quantized = quantization(t.module for t in targets)
    note = concentration_warning(names, [m.params for m in matrices], budget.costs * config.avg_rank)
    if note is not None:
        warnings.warn(note, SensloraWarning, stacklevel=2)
    if dist.enabled:
        alloc.calibration["processes"] = dist.world_size
        # The ranks are equal everywhere (same reduced diagonals); the timings are the main's.
        alloc = dist.broadcast(alloc)
    return alloc
