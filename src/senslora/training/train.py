"""Fine-tuning runs: ``train(config, out_dir)`` writes a run folder, ``evaluate_run`` reproduces it.

    senslora train --method senslora --model minilm --task movie-polarity --avg-rank 4 --seed 0 --out runs/x
    senslora evaluate runs/x [--merge merged/]

A run checks every input, then (:func:`train`): loads the task and the base model
(:mod:`.prepare`), checks and creates the run folder (:mod:`.run`, which describes its files),
builds the method's context (calibration batches, data / layer selection), writes ``config.json``
and ``splits.json``, lets the method prepare the model, and runs the training loop
(:mod:`.loop`: AdamW, linear schedule, method hooks, per-step timing) with checkpoints
(:mod:`.checkpoint`; ``--resume`` continues from the last one) and peak memory measurement
(:mod:`.memory`). Then it evaluates on the final split, saves ``adapter/`` and writes
``result.json`` last. With several processes (see :mod:`.loop`) only the main process evaluates
(validation and test, on the unwrapped model) and writes the run folder's files; the others wait
at barriers and ``train`` returns the main's result everywhere. Per-step time and peak memory in
``result.json`` are the main process's.

The names the rest of senslora (and its tests) use from here are re-exported below.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.cache import atomic_dir
from ..core.distributed import Dist, current
from ..core.errors import SensloraError, loading, step
from ..data.guard import check_output, model_input, task_input, writing
from .checkpoint import CHECKPOINTS_DIR, KEEP_CHECKPOINTS, TrainState, checkpoints
from .config import DATA_SELECTIONS, EVAL_SPLITS, LAYER_SELECTIONS, TrainConfig
from .loop import build_loop, epoch_batches, epoch_order, make_accelerator
from .methods.base import Method, get_method
from .prepare import (
    check_model_fits_task,
    load_base,
    load_task_for,
    method_context,
    parameter_counts,
    run_context,
    seed_everything,
)
from .run import (
    ADAPTER_DIR,
    CKA_DIR,
    CONFIG_NAME,
    RESULT_NAME,
    RESUME_FREE_FIELDS,
    SELECTION_DIR,
    SPLITS_NAME,
    check_out_dir,
    check_split,
    read_result,
    run_folder,
    to_json,
    write_result,
    write_run_files,
)

PEFT_FIX = (
    "check --targets / --target-names: they must match linear layers inside the blocks (the task head, "
    "classifier or score, is trained in full and cannot take an adapter)"
)

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINTS_DIR",
    "CKA_DIR",
    "CONFIG_NAME",
    "DATA_SELECTIONS",
    "EVAL_SPLITS",
    "KEEP_CHECKPOINTS",
    "LAYER_SELECTIONS",
    "RESULT_NAME",
    "RESUME_FREE_FIELDS",
    "SELECTION_DIR",
    "SPLITS_NAME",
    "TrainConfig",
    "TrainState",
    "checkpoints",
    "epoch_order",
    "evaluate_run",
    "load_task_for",
    "parameter_counts",
    "read_result",
    "seed_everything",
    "train",
]


def recorded_config(config: TrainConfig, method: Method | None = None) -> TrainConfig:
    """The config a run trains with and records in result.json: ``config`` plus the options its
    method implies (``cka`` implies ``layer_select: cka``). The benchmark compares configs with it."""
    method = method or get_method(config.method)
    return replace(config, options={**config.options, **method.implied_options})


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
    config = recorded_config(config, method)
    out = Path(out_dir)
    dist = current()
    with writing(out, [model_input(config.model), task_input(config.task)], lock=dist.is_main):
        check_out_dir(out, config, resume=resume, overwrite=overwrite)
        task = load_task_for(config)
        check_model_fits_task(config.model, task)
        accelerator = make_accelerator(config.device)
        seed_everything(config.seed)
        model, tokenizer = load_base(config, task, accelerator.device)
        with run_folder(out, overwrite=overwrite, dist=dist):
            return _run(
                config,
                out,
                task=task,
                method=method,
                model=model,
                tokenizer=tokenizer,
                accelerator=accelerator,
                resume=resume,
                progress=progress and dist.is_main,
                step_callback=step_callback,
                wall_start=wall_start,
                dist=dist,
            )


def _run(
    config: TrainConfig,
    out: Path,
    *,
    task,
    method: Method,
    model,
    tokenizer,
    accelerator,
    resume: bool,
    progress: bool,
    step_callback: Callable[[int], None] | None,
    wall_start: float,
    dist: Dist,
) -> dict:
    """:func:`train` once the inputs are loaded and the run folder exists."""
    from ..core.pipeline import package_versions

    device = accelerator.device
    with step("preparing the calibration data and selections", "check the task data and --calib-samples"):
        ctx, extras = run_context(config, out, task, model, tokenizer, device, progress, dist)
    splits = {"splits_seed": task.splits_seed, "label_names": task.label_names, **task.split_ids()}
    write_run_files(out, config, splits, resume=resume, dist=dist)

    with step(f"preparing the model for method {config.method}", PEFT_FIX):
        model = method.prepare(model, ctx).to(device)

    def validate(trained) -> dict:
        return _evaluate(trained, tokenizer, task.validation, task, config, method, device, False)

    loop = build_loop(
        model,
        method,
        config,
        ctx.total_steps,
        accelerator,
        dist=dist,
        out=out,
        validate=validate if config.eval_each_epoch else None,
        step_callback=step_callback,
        progress=progress,
        description=f"{config.method} {task.name}",
    )
    counts = parameter_counts(loop.unwrapped, method)
    state = loop.resume(checkpoints(out)[-1]) if resume and checkpoints(out) else TrainState()
    with step("training", "check --batch-size, --max-length and --device (memory), or --resume from a checkpoint"):
        memory = loop.run(state, epoch_batches(task.train, tokenizer, kind=task.model_kind, config=config))

    result = None
    if dist.is_main:
        trained = loop.unwrapped
        start = time.perf_counter()
        final = task.test if config.eval_split == "test" else task.validation
        from .evaluation import collapse_warning

        predicted: list = []
        with step(f"evaluating on the {config.eval_split} split", "check --eval-batch-size and --max-new-tokens"):
            metrics = _evaluate(
                trained, tokenizer, final, task, config, method, device, progress, predictions_out=predicted
            )
        test_time = time.perf_counter() - start
        references = [ex.label for ex in final] if task.problem != "generation" else []
        run_warnings = [w for w in [collapse_warning(task.problem, predicted, references, config.eval_split)] if w]
        with step(f"saving the adapter into {out}", "check that the disk has room"), atomic_dir(out / ADAPTER_DIR) as tmp:
            method.save(trained, tmp)
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
        result = write_result(out, result, keep_checkpoints=config.keep_checkpoints)
    # The other processes wait here for the main's test evaluation and files.
    return dist.broadcast(result)


def _evaluate(
    model, tokenizer, examples, task, config: TrainConfig, method: Method, device, progress: bool, **kwargs
) -> dict:
    """Metrics of ``model`` on ``examples`` after ``method.on_eval``: every evaluation of a run (per
    epoch, final, and ``evaluate_run``'s) goes through here."""
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


# ------------------------------------------------------------------------------------- evaluate
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
    ``merge_to`` writes the merged model and tokenizer as a plain Hugging Face folder (the method's
    :meth:`~senslora.training.methods.base.Method.merge`: PEFT's ``merge_and_unload`` unless the
    method has its own), usable as ``--model``.
    """
    run = Path(run_dir)
    result = read_result(run)
    config = TrainConfig.from_dict(result.get("config", {}))
    if device is not None:
        config = replace(config, device=device)
    method = get_method(config.method)
    if merge_to is None:
        return _evaluate_run(run, result, config, method, None, device, progress)
    check_output(merge_to, flag="--merge")
    if Path(merge_to).exists() and not overwrite:
        raise SensloraError(f"merge folder {merge_to} already exists; remove it or pass --overwrite")
    if not method.mergeable:
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
    check_split(run, split, examples, task.name)
    dev = resolve_device(config.device)
    seed_everything(config.seed)
    model, tokenizer = load_base(config, task, dev)
    ctx = method_context(config, task, [], int(result.get("steps", 1)), run, dev, progress)
    adapter = run / ADAPTER_DIR
    if not adapter.is_dir():
        raise SensloraError(f"{run} has no {ADAPTER_DIR}/ folder; rerun `senslora train` for it")
    with loading("the adapter", adapter, f"rerun `senslora train` for {run}"), step(
        f"loading the adapter {adapter}", f"rerun `senslora train` for {run}"
    ):
        model = method.load(model, adapter, ctx)
    model = model.to(dev)
    with step(f"evaluating on the {split} split", "check --device"):
        metrics = _evaluate(model, tokenizer, examples, task, config, method, dev, progress)
    metrics = json.loads(to_json(metrics))
    if merge_to is not None:
        merged = method.merge(model)
        with step(f"writing the merged model into {merge_to}", "check that the disk has room"), atomic_dir(
            merge_to
        ) as tmp:
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    return {
        "metrics": metrics,
        "recorded": result.get("metrics"),
        "reproduced": metrics == result.get("metrics"),
        "merged": str(merge_to) if merge_to is not None else None,
    }
