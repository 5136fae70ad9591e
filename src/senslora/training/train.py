"""Fine-tuning runs: ``train(config, out_dir)`` writes a run folder, ``evaluate_run`` reproduces it.

    senslora train --method senslora --model minilm --task movie-polarity --avg-rank 4 --seed 0 --out runs/x
    senslora evaluate runs/x [--merge merged/]

A run folder holds::

    config.json          the TrainConfig (a --resume must match it, except the device)
    splits.json          example ids of train / validation / test, and the class names
    allocation/          senslora: the allocation (reused when the run resumes)
    checkpoints/step-N/  the last 2 checkpoints; removed after success unless keep_checkpoints
    adapter/             what the method trained (PEFT ``save_pretrained`` for the LoRA family)
    result.json          written last, atomically: a run is complete exactly when it exists

The loop (an ``accelerate`` Accelerator, AdamW over the trainable parameters, linear warm-up and
decay) runs, for every batch: ``method.on_step_begin`` -> forward -> task loss (the mean of
:func:`senslora.core.losses.per_example_loss`, plus ``method.extra_loss(model)`` when a method defines
it, e.g. AdaLoRA's orthogonality penalty) -> backward -> gradient clipping -> ``optimizer.step``
-> ``method.on_optimizer_step`` -> ``scheduler.step`` -> ``zero_grad``. The data order of epoch
``e`` is a permutation drawn from a ``torch.Generator`` seeded with ``(seed, e)``, so a resumed run
skips exactly the batches already seen. A checkpoint (trainable parameters, optimizer, scheduler,
step, epoch, Python / NumPy / torch RNG states, and ``method.state_dict()`` when a method defines
``state_dict`` / ``load_state_dict``) is written atomically every ``save_every`` steps and at each
epoch end; on the CPU a resumed run ends with exactly the metrics of an uninterrupted one.

Measured: per-step time (forward to ``zero_grad``; each process's first step is warm-up and left
out of the mean and median), total step time, evaluation time, and peak memory. ``peak_memory_mb``
is the growth over the steps after the first: on CUDA ``torch.cuda.max_memory_allocated`` minus
the memory allocated after the first step; on the CPU (Linux) the peak resident memory
(``ru_maxrss``) minus the resident memory after the first step, with freed heap returned to the
OS (glibc ``malloc_trim``) and the peak reset (``/proc/self/clear_refs``) at that point. Measuring
after the first step keeps one-off costs out (lazily allocated kernels and thread buffers, which a
method that ran forward passes before training, like senslora's allocation, has already paid;
AdamW's state, allocated at the first step). ``peak_memory_total_mb`` is the absolute peak during
training (allocated CUDA memory, or the process's RSS). Without ``/proc`` only the growth of
``ru_maxrss`` from the start of training is reported, a lower bound.

Several processes (``accelerate launch --num_processes N -m senslora train ...``, or ``torchrun``):
every process builds the same epoch order and batches; each batch of ``batch_size`` examples is
split over the processes (rows ``rank::N``), so a step still sees ``batch_size`` examples and the
run has the same number of steps and learning-rate schedule as with one process. The model is
wrapped in DDP (``accelerator.prepare``); each process back-propagates ``N / batch_size`` times the
sum of its examples' losses, so DDP's gradient average is the gradient of the batch mean loss. Method
hooks (AdaLoRA's ``update_and_allocate``, DyLoRA's rank draw, extra losses) see the unwrapped model
and behave identically on every process (same seeds, synchronised gradients). Only the main
process evaluates (validation and test, on the unwrapped model), writes ``config.json``,
``splits.json``, checkpoints (with every process's RNG state), ``adapter/`` and ``result.json``;
the others wait at barriers and ``train`` returns the main's result everywhere. Per-step time and
peak memory in ``result.json`` are the main process's.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.cache import atomic_dir, atomic_write_text
from ..core.distributed import SINGLE, Dist, current
from ..core.errors import SensloraError, loading
from ..core.timing import sync_device
from ..data.guard import model_input, task_input, writing
from .config import DATA_SELECTIONS, EVAL_SPLITS, LAYER_SELECTIONS, TrainConfig  # noqa: F401
from .methods.base import Method, MethodContext, adapter_parameter_count, get_method

CONFIG_NAME = "config.json"
SPLITS_NAME = "splits.json"
RESULT_NAME = "result.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
SELECTION_DIR = "selection"
CKA_DIR = "cka"
KEEP_CHECKPOINTS = 2
# Config fields a resumed run may change.
RESUME_FREE_FIELDS = ("device",)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so fresh heads and samples are reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Progress of a run, saved in every checkpoint (``state.json``)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch done
    loss_sum: float = 0.0  # summed task loss of the current epoch's batches
    history: list[dict] = field(default_factory=list)  # one entry per completed epoch
    step_times: list[float] = field(default_factory=list)  # seconds per step, warm-up steps left out
    train_time_s: float = 0.0  # seconds of all steps
    eval_time_s: float = 0.0  # seconds of validation evaluations
    peak_memory_mb: float = 0.0  # peak growth during training, MiB (see the module docstring)
    peak_memory_total_mb: float = 0.0  # absolute peak during training, MiB
    resumed_at: list[int] = field(default_factory=list)  # steps at which the run was resumed


# ------------------------------------------------------------------------------------- helpers
def load_task_for(config: TrainConfig):
    """The :class:`senslora.data.tasks.TaskData` a config describes."""
    from ..data.tasks import load_task

    return load_task(
        config.task,
        text_column=config.text_column,
        text_pair_column=config.text_pair_column,
        label_column=config.label_column,
        problem=config.problem,
        split_seed=config.split_seed,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
        loose_labels=config.loose_labels,
    )


def _check_model_fits_task(model_name: str, task) -> None:
    """A generation task needs a causal LM (checked on the config, before loading weights)."""
    if task.problem != "generation":
        return
    from transformers import AutoConfig

    from ..data.models import resolve_model_path

    path = resolve_model_path(model_name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SensloraError(f"cannot read the model config in {path} ({exc})") from exc
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForCausalLM") for a in architectures):
        shown = ", ".join(architectures) or config.model_type
        raise SensloraError(
            f"task {task.name} is a generation task and needs a causal language model; {model_name} is {shown} "
            "(use e.g. --model smollm2)"
        )


def _load_base(config: TrainConfig, task, device) -> tuple[Any, Any]:
    from ..data.models import load_model, model_kind

    num_labels = task.num_labels if task.problem == "classification" else 2
    model, tokenizer = load_model(
        config.model, kind=task.model_kind, num_labels=num_labels, device=device, dtype=config.dtype
    )
    if model_kind(model) != task.model_kind:
        raise SensloraError(
            f"task {task.name} needs a {task.model_kind} model; {config.model} loaded as {model_kind(model)}"
        )
    if task.label_names:
        model.config.id2label = dict(enumerate(task.label_names))
        model.config.label2id = {name: i for i, name in enumerate(task.label_names)}
    return model, tokenizer


def _method_context(
    config: TrainConfig, task, calibration: list[dict], total_steps: int, out: Path, device, progress: bool
) -> MethodContext:
    options = {"model": config.model, "progress": progress, **config.options}
    return MethodContext(
        avg_rank=config.avg_rank,
        lora_alpha=config.resolved_lora_alpha,
        lora_dropout=config.lora_dropout,
        task_kind=task.model_kind,
        calibration_batches=calibration,
        total_steps=total_steps,
        seed=config.seed,
        options=options,
        out_dir=out,
        device=device,
    )


def _evaluate(
    model, tokenizer, examples, task, config: TrainConfig, method: Method, device, progress: bool, **kwargs
) -> dict:
    from .evaluation import evaluate_model

    method.on_eval(model)
    return evaluate_model(
        model,
        tokenizer,
        examples,
        task,
        batch_size=config.eval_batch_size or config.batch_size,
        max_length=config.max_length,
        max_new_tokens=config.max_new_tokens,
        device=device,
        progress=progress,
        **kwargs,
    )


def parameter_counts(model, method: Method) -> dict[str, int]:
    """``adapter``: trainable without the task head (what budgets match); ``budget``: the method's
    own budget count when it defines ``budget_parameter_count`` (else ``adapter``); ``trainable``:
    every trainable parameter including the head; ``total``: all parameters of the trained model."""
    adapter = adapter_parameter_count(model)
    budget = getattr(method, "budget_parameter_count", None)
    return {
        "adapter": adapter,
        "budget": int(budget(model)) if callable(budget) else adapter,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the ``n`` train examples in ``epoch``: a permutation seeded by ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=generator).tolist()


def _training_loss(
    model,
    batch: dict,
    method: Method,
    *,
    unwrapped=None,
    dist: Dist = SINGLE,
    global_size: int = 0,
    weight: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """(loss to back-propagate, task loss of the whole batch as a float).

    With several processes ``batch`` is this process's rows of a batch of ``global_size`` examples
    (``weight`` 0 for a stand-in row when it got none): the loss is ``world_size / global_size``
    times the sum of its per-example losses, so DDP's gradient average is the gradient of the whole
    batch's mean loss; the reported task loss is summed over the processes. Method extras see
    ``unwrapped`` (the model without its DDP wrapper).
    """
    from ..core.losses import per_example_loss

    losses = per_example_loss(model, batch)
    if dist.enabled:
        local = losses.sum() * weight
        loss = local * (dist.world_size / global_size)
        total = dist.all_reduce_(local.detach().double().reshape(1))
        value = float(total.item()) / global_size
    else:
        loss = losses.mean()
        value = float(loss.detach())
    extra = getattr(method, "extra_loss", None)
    if callable(extra):
        penalty = extra(unwrapped if unwrapped is not None else model)
        if penalty is not None:
            loss = loss + penalty
    return loss, value


def _local_rows(batch: dict, dist: Dist) -> tuple[dict, int, float]:
    """(this process's rows ``rank::world_size`` of ``batch``, the batch's size, weight).

    A process left without rows (a batch smaller than the number of processes) gets the first row
    with weight 0, so that it still takes part in DDP's gradient reduction.
    """
    size = int(batch["input_ids"].shape[0])
    rows = slice(dist.rank, None, dist.world_size) if dist.rank < size else slice(0, 1)
    local = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return local, size, 1.0 if dist.rank < size else 0.0


def _record_memory(state: TrainState, memory: _PeakMemory) -> None:
    state.peak_memory_mb = max(state.peak_memory_mb, memory.growth_mb())
    state.peak_memory_total_mb = max(state.peak_memory_total_mb, memory.total_mb())


class _PeakMemory:
    """Peak memory during training (see the module docstring); :meth:`after_warmup` re-bases it."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = self._reset()
        self.base = self._in_use()
        self.total = 0  # absolute peak before the last re-base
        self.steady = False

    def _reset(self) -> bool:
        """Reset the peak to the memory in use now (CPU: after returning freed heap to the OS)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        import ctypes
        import gc

        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS
        except OSError:
            return False
        return True

    def _in_use(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        if not self.resettable:
            return self._peak()  # only growth of the peak can be seen
        import os

        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        try:
            import resource
        except ImportError:  # Windows
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB

    def after_warmup(self) -> None:
        """Measure from now on (after the first step: one-off allocations stay out of the growth)."""
        if self.resettable:
            self.total = max(self.total, self._peak())
            self._reset()
            self.base = self._in_use()
            self.steady = True

    def growth_mb(self) -> float:
        return max(0, self._peak() - self.base) / 2**20

    def total_mb(self) -> float:
        return max(self.total, self._peak()) / 2**20

    @property
    def measure(self) -> str:
        what = "cuda max_memory_allocated" if self.cuda else "cpu peak RSS"
        if self.steady:
            return f"{what} over the steps after the first, minus the memory in use after the first step"
        if self.resettable:
            return f"{what} during training minus the memory in use when training starts"
        return f"{what}: growth of ru_maxrss during training (a lower bound)"


# ------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    folder = Path(out) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _rng_file(rank: int) -> str:
    """The RNG state file of process ``rank`` in a checkpoint (``rng.pt`` for the main process)."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def _save_checkpoint(
    out: Path, state: TrainState, model, optimizer, scheduler, method: Method, dist: Dist = SINGLE
) -> None:
    """Write a checkpoint of ``model`` (unwrapped). With several processes: the main process writes
    it, with every process's RNG state, and the others wait at a barrier."""
    from safetensors.torch import save_file

    rng_states = dist.gather(_rng_state())
    if dist.is_main:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        with atomic_dir(out / CHECKPOINTS_DIR / f"step-{state.step}") as tmp:
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for rank, rng in enumerate(rng_states):
                torch.save(rng, tmp / _rng_file(rank))
            method_state = getattr(method, "state_dict", None)
            if callable(method_state):
                torch.save(method_state(), tmp / "method.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state)))  # last: marks the checkpoint complete
        for old in checkpoints(out)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _load_checkpoint(folder: Path, model, optimizer, scheduler, method: Method, rank: int = 0) -> TrainState:
    fix = f"delete {folder} to resume from the checkpoint before it, or rerun with --overwrite"
    with loading("the checkpoint", folder, fix):
        return _read_checkpoint(folder, model, optimizer, scheduler, method, rank)


def _read_checkpoint(folder: Path, model, optimizer, scheduler, method: Method, rank: int) -> TrainState:
    from safetensors.torch import load_file

    saved = load_file(str(folder / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params) or any(saved[n].shape != params[n].shape for n in saved):
        raise SensloraError(
            f"checkpoint {folder} does not match the model this config builds; rerun with --overwrite"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    # Our own files; the NumPy RNG state and method states need full unpickling.
    if callable(getattr(method, "load_state_dict", None)) and (folder / "method.pt").is_file():
        method.load_state_dict(torch.load(folder / "method.pt", weights_only=False))
    # This process's RNG state (a run resumed with more processes than it had: the main's).
    rng_path = folder / _rng_file(rank)
    _set_rng_state(torch.load(rng_path if rng_path.is_file() else folder / "rng.pt", weights_only=False))
    return TrainState(**json.loads((folder / "state.json").read_text()))


# ------------------------------------------------------------------------------------- run folder
def _check_out_dir(out: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds something else than what this call may continue or replace."""
    if resume and overwrite:
        raise SensloraError("pass either --resume or --overwrite, not both")
    if resume and not out.exists():
        raise SensloraError(f"--resume: {out} does not exist; drop --resume to start a new run there")
    if not out.exists() or overwrite:
        return
    if not out.is_dir():
        raise SensloraError(f"{out} exists and is not a folder; choose another --out")
    if (out / RESULT_NAME).exists():
        raise SensloraError(
            f"{out} holds a completed run; pass --overwrite to replace it or choose another --out"
        )
    if not any(out.iterdir()):
        return
    if not resume:
        raise SensloraError(
            f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to start over"
        )
    saved_path = out / CONFIG_NAME
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        raise SensloraError(
            f"{out} is not a senslora run folder (no readable {CONFIG_NAME}); choose another --out"
        ) from None
    # Fields added since the run started take their defaults.
    saved = TrainConfig.from_dict(saved).to_dict() if isinstance(saved, dict) else {}
    current = config.to_dict()
    differ = sorted(
        k for k in set(saved) | set(current) if k not in RESUME_FREE_FIELDS and saved.get(k) != current.get(k)
    )
    if differ:
        raise SensloraError(
            f"--resume needs the settings of the interrupted run ({saved_path}); these differ: {', '.join(differ)}"
        )


def _read_json(path: Path, what: str) -> Any:
    """A JSON file of a run folder that --resume reuses, with a one-line error when it is damaged."""
    with loading(what, path, "the run folder is damaged: rerun with --overwrite"):
        return json.loads(path.read_text())


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    step_callback: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``config.model`` on ``config.task`` with ``config.method``; returns ``result.json``.

    Args:
        out_dir: the run folder. It must not hold a completed run (unless ``overwrite``) nor an
            unfinished one (unless ``resume`` or ``overwrite``).
        resume: continue from the last complete checkpoint in ``out_dir`` (start afresh when there
            is none; a folder that does not exist is an error); the config must equal the saved one
            except for the device.
        overwrite: replace whatever ``out_dir`` holds (only once the inputs have been checked).
        progress: show progress bars and a line per epoch.
        step_callback: called with the step number after every optimizer step (and checkpoint).

    Every input is checked (config values, method, task data, model, the task's model kind) before
    the folder is touched; an error before the first checkpoint removes the folder this call created.
    The run folder must be apart from the model folder and the task data, and is locked while the
    run writes it (:mod:`senslora.data.guard`).
    """
    wall_start = time.perf_counter()
    config.validate()
    method = get_method(config.method)
    config = replace(config, options={**config.options, **method.implied_options})
    out = Path(out_dir)
    dist = current()
    with writing(out, [model_input(config.model), task_input(config.task)], lock=dist.is_main):
        _check_out_dir(out, config, resume=resume, overwrite=overwrite)
        return _train(config, out, method, resume, overwrite, progress, step_callback, wall_start, dist)


def _train(config, out, method, resume, overwrite, progress, step_callback, wall_start, dist) -> dict:
    """:func:`train` once the run folder is checked and locked."""
    task = load_task_for(config)
    _check_model_fits_task(config.model, task)
    accelerator = _accelerator(config.device)
    seed_everything(config.seed)
    model, tokenizer = _load_base(config, task, accelerator.device)

    fresh = overwrite or not out.exists() or not any(out.iterdir())
    dist.barrier()  # every process has checked the folder before the main one touches it
    if dist.is_main:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    try:
        return _run(
            config,
            out,
            task,
            method,
            model,
            tokenizer,
            accelerator,
            resume,
            progress and dist.is_main,
            step_callback,
            wall_start,
            dist,
        )
    except BaseException:
        if fresh and dist.is_main and not checkpoints(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _select_data(
    config: TrainConfig, out: Path, task, model, tokenizer, device, progress: bool, dist: Dist = SINGLE
) -> tuple[list, dict]:
    """``--data-select quality``: keep the best ``data_keep`` fraction of the train split
    (:func:`senslora.training.quality.select_training_data`), saved into ``selection/`` and reused on resume.
    With several processes every one scores the data and the main's selection is used by all."""
    from .quality import select_training_data

    folder = out / SELECTION_DIR
    if (folder / "selection.json").is_file():
        summary = _read_json(folder / "selection.json", "the data selection")
    else:
        _, selection = select_training_data(
            model,
            tokenizer,
            task.train,
            kind=task.model_kind,
            keep=float(config.options.get("data_keep", 0.5)),
            max_length=config.max_length,
            batch_size=config.batch_size,
            device=device,
            progress=progress,
        )
        if dist.is_main:
            selection.save(folder, plot=bool(config.options.get("plot", True)))
        summary = selection.summary()
    summary = dist.broadcast(summary)
    kept = set(summary["kept_ids"])
    train = [ex for ex in task.train if ex.id in kept]
    return train, {k: v for k, v in summary.items() if k not in ("kept_ids", "dropped")}


def _select_layers(
    config: TrainConfig,
    out: Path,
    model,
    calibration: list[dict],
    device,
    progress: bool,
    dist: Dist = SINGLE,
) -> tuple[list[int], dict]:
    """``--layers cka``: the blocks to adapt (:func:`senslora.training.cka.select_layers_by_cka` on the
    calibration batches), saved into ``cka/`` and reused on resume. With several processes every
    one computes it and the main's selection is used by all."""
    from .cka import LayerSelection, select_layers_by_cka

    folder = out / CKA_DIR
    if (folder / "cka.json").is_file():
        selection = LayerSelection.load(folder)
    else:
        ratio = float(config.options.get("layer_ratio", 0.5))
        selection = select_layers_by_cka(model, calibration, ratio, device=device, progress=progress)
        if dist.is_main:
            selection.save(folder, plot=bool(config.options.get("plot", True)))
    return dist.broadcast((list(selection.kept), selection.to_dict()))


def _match_layer_budget(ctx: MethodContext, model, record: dict) -> None:
    """Spend uniform LoRA's whole-model parameter budget on the kept blocks only.

    Methods are compared at equal budgets, so with CKA layer selection the average rank (and alpha,
    keeping alpha / r) grows by (LoRA cost per rank on all targets) / (on the kept targets).
    ``layer_budget="kept"`` keeps the plain average rank instead (fewer parameters, as in seed 003).
    """
    from ..core.targets import find_targets

    spec = ctx.options.get("target_modules")
    all_cost = sum(t.lora_params_per_rank for t in find_targets(model, spec))
    kept_cost = sum(t.lora_params_per_rank for t in find_targets(model, spec, ctx.options["layers"]))
    scale = all_cost / kept_cost
    ctx.avg_rank = ctx.avg_rank * scale
    ctx.lora_alpha = ctx.lora_alpha * scale
    record["budget_scale"] = scale
    record["avg_rank_on_kept_blocks"] = ctx.avg_rank


def _accelerator(device):
    """The run's Accelerator. Batches are split over processes (``split_batches``): a step is one
    batch of ``batch_size`` examples whatever the number of processes, and the prepared scheduler
    steps once per optimizer step."""
    from accelerate import Accelerator, DataLoaderConfiguration

    from ..data.models import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return Accelerator(cpu=dev.type == "cpu", dataloader_config=DataLoaderConfiguration(split_batches=True))


def _run(
    config,
    out,
    task,
    method,
    model,
    tokenizer,
    accelerator,
    resume,
    progress,
    step_callback,
    wall_start,
    dist,
) -> dict:
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from ..core.losses import move_batch
    from ..core.pipeline import package_versions
    from ..data.examples import make_batches, sample_examples

    kind, device = task.model_kind, accelerator.device
    extras: dict[str, Any] = {}
    if config.options.get("data_select", "none") == "quality":
        task.train, extras["data_selection"] = _select_data(
            config, out, task, model, tokenizer, device, progress, dist
        )
    calibration = make_batches(
        sample_examples(task.train, config.calib_samples, config.seed),
        tokenizer,
        kind=kind,
        max_length=config.max_length,
        batch_size=config.batch_size,
    )
    steps_per_epoch = math.ceil(len(task.train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    ctx = _method_context(config, task, calibration, total_steps, out, device, progress)
    if config.options.get("layer_select", "all") == "cka":
        ctx.options["layers"], extras["layer_selection"] = _select_layers(
            config, out, model, calibration, device, progress, dist
        )
        if config.options.get("layer_budget", "match") == "match":
            _match_layer_budget(ctx, model, extras["layer_selection"])
    splits = {"splits_seed": task.splits_seed, "label_names": task.label_names, **task.split_ids()}
    if resume and (out / SPLITS_NAME).is_file() and _read_json(out / SPLITS_NAME, "the splits") != splits:
        raise SensloraError(f"the data differs from {out / SPLITS_NAME}; it changed since the run started")
    if dist.is_main:
        atomic_write_text(out / CONFIG_NAME, _json(config.to_dict()))
        atomic_write_text(out / SPLITS_NAME, _json(splits))

    model = method.prepare(model, ctx).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SensloraError(f"method {config.method} left no trainable parameters")
    counts = parameter_counts(model, method)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    warmup = math.ceil(config.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    # With several processes the model comes back wrapped in DDP; hooks, evaluation and saving
    # use the unwrapped model (the same parameters).
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    state = TrainState()
    last = checkpoints(out)[-1] if resume and checkpoints(out) else None
    if last is not None:
        state = _load_checkpoint(last, unwrapped, optimizer, scheduler, method, dist.rank)
        state.resumed_at.append(state.step)

    memory = _PeakMemory(device)
    bar = tqdm(
        total=total_steps, initial=state.step, desc=f"{config.method} {task.name}", disable=not progress
    )
    warm = True  # the first step of every process is warm-up
    model.train()
    for epoch in range(state.epoch, config.epochs):
        order = epoch_order(len(task.train), config.seed, epoch)
        batches = make_batches(
            [task.train[i] for i in order],
            tokenizer,
            kind=kind,
            max_length=config.max_length,
            batch_size=config.batch_size,
        )
        for index in range(state.batch, len(batches)):
            batch, global_size, weight = batches[index], 0, 1.0
            if dist.enabled:
                batch, global_size, weight = _local_rows(batch, dist)
            batch = move_batch(batch, device)
            start = time.perf_counter()
            method.on_step_begin(unwrapped, state.step)
            loss, task_loss = _training_loss(
                model, batch, method, unwrapped=unwrapped, dist=dist, global_size=global_size, weight=weight
            )
            accelerator.backward(loss)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            method.on_optimizer_step(unwrapped, state.step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sync_device(device)
            seconds = time.perf_counter() - start
            state.train_time_s += seconds
            if warm:
                memory.after_warmup()
            else:
                state.step_times.append(seconds)
            warm = False
            state.step += 1
            state.batch = index + 1
            state.loss_sum += task_loss
            bar.update(1)
            bar.set_postfix(loss=f"{task_loss:.4f}")
            if config.save_every and state.step % config.save_every == 0 and state.batch < len(batches):
                _record_memory(state, memory)
                _save_checkpoint(out, state, unwrapped, optimizer, scheduler, method, dist)
            if step_callback is not None:
                step_callback(state.step)
        _record_memory(state, memory)
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": state.loss_sum / max(1, state.batch),
        }
        if config.eval_each_epoch and dist.is_main:
            # The main process evaluates; the others wait in _save_checkpoint.
            start = time.perf_counter()
            entry["validation"] = _evaluate(
                unwrapped, tokenizer, task.validation, task, config, method, device, False
            )
            state.eval_time_s += time.perf_counter() - start
        model.train()
        state.history.append(entry)
        state.epoch, state.batch, state.loss_sum = epoch + 1, 0, 0.0
        if progress:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in entry.get("validation", {}).items())
            bar.write(
                f"epoch {epoch + 1}: train_loss={entry['train_loss']:.4f}"
                + (f", validation {shown}" if shown else "")
            )
        _save_checkpoint(out, state, unwrapped, optimizer, scheduler, method, dist)
    bar.close()

    result = None
    if dist.is_main:
        start = time.perf_counter()
        final = task.test if config.eval_split == "test" else task.validation
        from .evaluation import single_class_warning

        predicted: list = []
        metrics = _evaluate(
            unwrapped, tokenizer, final, task, config, method, device, progress, predictions_out=predicted
        )
        test_time = time.perf_counter() - start
        run_warnings = [w for w in [single_class_warning(task.problem, predicted, config.eval_split)] if w]
        with atomic_dir(out / ADAPTER_DIR) as tmp:
            method.save(unwrapped, tmp)
        times = state.step_times
        result = {
            "status": "ok",
            "method": config.method,
            "task": task.name,
            "model": config.model,
            "seed": config.seed,
            "problem": task.problem,
            "labels": task.describe(),
            "primary_metric": task.primary_metric,
            "metrics": metrics,
            "split": config.eval_split,
            "warnings": run_warnings,
            "history": state.history,
            "trainable_params": counts["adapter"],
            "budget_params": counts["budget"],
            "trainable_params_total": counts["trainable"],
            "total_params": counts["total"],
            "steps": state.step,
            "processes": dist.world_size,
            "train_time_s": state.train_time_s,
            "step_time_mean_s": statistics.fmean(times) if times else None,
            "step_time_median_s": statistics.median(times) if times else None,
            "eval_time_s": state.eval_time_s,
            "test_time_s": test_time,
            "wall_time_s": time.perf_counter() - wall_start,
            "peak_memory_mb": state.peak_memory_mb,
            "peak_memory_total_mb": state.peak_memory_total_mb,
            "peak_memory_measure": memory.measure,
            "allocation_time_s": method.record.get("allocation_time_s"),
            "method_record": method.record,
            "data": {
                "train": len(task.train),
                "validation": len(task.validation),
                "test": len(task.test),
                "splits_seed": task.splits_seed,
            },
            "resumed_at": state.resumed_at,
            **extras,
            "config": config.to_dict(),
            "versions": package_versions(),
        }
        atomic_write_text(out / RESULT_NAME, _json(result))
        if not config.keep_checkpoints:
            shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
        result = json.loads(_json(result))
    # The other processes wait here for the main's test evaluation and files.
    return dist.broadcast(result)


# ------------------------------------------------------------------------------------- evaluate
def read_result(run_dir: str | Path) -> dict[str, Any]:
    """The ``result.json`` of a completed run folder."""
    path = Path(run_dir) / RESULT_NAME
    if not path.is_file():
        raise SensloraError(
            f"{run_dir} is not a completed run folder (no {RESULT_NAME}); run `senslora train` (or --resume it)"
        )
    with loading("the run result", path, f"rerun `senslora train` for {run_dir}"):
        result = json.loads(path.read_text())
    if not isinstance(result, dict):
        raise SensloraError(
            f"{path} is not a run result (a JSON object); rerun `senslora train` for {run_dir}"
        )
    return result


def evaluate_run(
    run_dir: str | Path,
    *,
    merge_to: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Reload a run's base model and adapter, recompute its final metrics (test, or validation for
    a validation-only run), optionally merge.

    Returns ``{"metrics", "recorded" (result.json's), "reproduced" (equal), "merged" (folder or None)}``.
    ``merge_to`` writes the merged model and tokenizer as a plain Hugging Face folder (PEFT's
    ``merge_and_unload``, or the method's ``merge``), usable as ``--model``.
    """
    run = Path(run_dir)
    result = read_result(run)
    config = TrainConfig.from_dict(result.get("config", {}))
    if device is not None:
        config = replace(config, device=device)
    method = get_method(config.method)
    if merge_to is None:
        return _evaluate_run(run, result, config, method, None, device, progress)
    if Path(merge_to).exists() and not overwrite:
        raise SensloraError(f"merge folder {merge_to} already exists; remove it or pass --overwrite")
    if not method.is_peft and not callable(getattr(method, "merge", None)):
        raise SensloraError(f"method {config.method} cannot be merged into the base model")
    inputs = [("the run folder", run), model_input(config.model), task_input(config.task)]
    with writing(merge_to, inputs, flag="--merge"):
        return _evaluate_run(run, result, config, method, Path(merge_to), device, progress)


def _evaluate_run(run: Path, result: dict, config: TrainConfig, method: Method, merge_to, device, progress):
    from ..data.models import resolve_device

    task = load_task_for(config)
    # A validation-only run (a sweep) is reproduced on validation: it must never read test.
    split = config.eval_split
    examples = task.test if split == "test" else task.validation
    try:
        saved = json.loads((run / SPLITS_NAME).read_text())[split]
    except (OSError, ValueError, KeyError) as exc:
        raise SensloraError(f"cannot read {run / SPLITS_NAME} ({exc})") from None
    if [ex.id for ex in examples] != saved:
        raise SensloraError(
            f"the {split} split of {task.name} differs from {run / SPLITS_NAME}; the data changed since training"
        )
    dev = resolve_device(config.device)
    seed_everything(config.seed)
    model, tokenizer = _load_base(config, task, dev)
    ctx = _method_context(config, task, [], int(result.get("steps", 1)), run, dev, progress)
    adapter = run / ADAPTER_DIR
    if not adapter.is_dir():
        raise SensloraError(f"{run} has no {ADAPTER_DIR}/ folder; rerun `senslora train` for it")
    with loading("the adapter", adapter, f"rerun `senslora train` for {run}"):
        model = method.load(model, adapter, ctx)
    model = model.to(dev)
    metrics = _evaluate(model, tokenizer, examples, task, config, method, dev, progress)
    metrics = json.loads(_json(metrics))
    if merge_to is not None:
        merged = model.merge_and_unload() if method.is_peft else method.merge(model)
        with atomic_dir(merge_to) as tmp:
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    return {
        "metrics": metrics,
        "recorded": result.get("metrics"),
        "reproduced": metrics == result.get("metrics"),
        "merged": str(merge_to) if merge_to is not None else None,
    }
