"""What a run builds before its first training step: the task data, the base model, and the
method's context (calibration batches, step count, ``--data-select quality`` / ``--layers cka``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.distributed import SINGLE, Dist
from ..core.errors import SensloraError
from .config import TrainConfig
from .methods.base import Method, MethodContext, adapter_parameter_count
from .run import CKA_DIR, SELECTION_DIR, read_json


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so fresh heads and samples are reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
        data_format=config.data_format,
        allow_label_text=config.allow_label_text,
    )


def check_model_fits_task(model_name: str, task) -> None:
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


def load_base(config: TrainConfig, task, device) -> tuple[Any, Any]:
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


def method_context(
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


def select_data(
    config: TrainConfig, out: Path, task, model, tokenizer, device, progress: bool, dist: Dist = SINGLE
) -> tuple[list, dict]:
    """``--data-select quality``: keep the best ``data_keep`` fraction of the train split
    (:func:`senslora.training.quality.select_training_data`), saved into ``selection/`` and reused on resume.
    With several processes every one scores the data and the main's selection is used by all."""
    from .quality import select_training_data

    folder = out / SELECTION_DIR
    if (folder / "selection.json").is_file():
        summary = read_json(folder / "selection.json", "the data selection")
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


def select_layers(
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


def match_layer_budget(ctx: MethodContext, model, record: dict) -> None:
    """Spend uniform LoRA's whole-model parameter budget on the kept blocks only.

    Methods are compared at equal budgets, so with CKA layer selection the average rank (and alpha,
    keeping alpha / r) grows by (LoRA cost per rank on all targets) / (on the kept targets).
    ``layer_budget="kept"`` keeps the plain average rank instead (fewer parameters, as in the layer-wise LoRA with CKA paper).
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


def run_context(
    config: TrainConfig, out: Path, task, model, tokenizer, device, progress: bool, dist: Dist = SINGLE
) -> tuple[MethodContext, dict[str, Any]]:
    """(the method's context, the selection records for ``result.json``) of a run.

    ``--data-select quality`` narrows ``task.train`` first (in place); the calibration batches are
    sampled from what remains; ``--layers cka`` picks the blocks from them (with ``layer_budget``
    ``match`` spending the whole-model budget on them).
    """
    from ..data.examples import make_batches, sample_examples

    extras: dict[str, Any] = {}
    if config.options.get("data_select", "none") == "quality":
        task.train, extras["data_selection"] = select_data(
            config, out, task, model, tokenizer, device, progress, dist
        )
    calibration = make_batches(
        sample_examples(task.train, config.calib_samples, config.seed),
        tokenizer,
        kind=task.model_kind,
        max_length=config.max_length,
        batch_size=config.batch_size,
    )
    total_steps = math.ceil(len(task.train) / config.batch_size) * config.epochs
    ctx = method_context(config, task, calibration, total_steps, out, device, progress)
    if config.options.get("layer_select", "all") == "cka":
        ctx.options["layers"], extras["layer_selection"] = select_layers(
            config, out, model, calibration, device, progress, dist
        )
        if config.options.get("layer_budget", "match") == "match":
            match_layer_budget(ctx, model, extras["layer_selection"])
    return ctx, extras


def parameter_counts(model, method: Method) -> dict[str, int]:
    """``adapter``: trainable without the task head (what budgets match); ``budget``: the method's
    :meth:`~senslora.training.methods.base.Method.budget_parameter_count` (``adapter`` unless the
    method counts its budget otherwise); ``trainable``: every trainable parameter including the
    head; ``total``: all parameters of the trained model."""
    return {
        "adapter": adapter_parameter_count(model),
        "budget": int(method.budget_parameter_count(model)),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
