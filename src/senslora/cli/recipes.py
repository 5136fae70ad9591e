"""Thin recipes behind the CLI subcommands: load model and data, call the library, write outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.errors import SensloraError, step
from ..data.guard import check_output, data_input, model_input, task_input, writing
from ..training.config import TrainConfig
from ..training.options import parse_option
from ..training.train import load_task_for, seed_everything

NAMED_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
TARGETS_FIX = (
    "check --targets / --target-names (linear layers inside the blocks) and --estimator, --batch-size "
    "and --max-length (memory)"
)


def check_out_dir(out: str | Path, overwrite: bool, inputs=()) -> Path:
    """Fail before any work if the output folder is not one or overlaps ``inputs``
    (:func:`senslora.data.guard.check_output`), exists (unless ``overwrite``) or its parent is unwritable."""
    out = check_output(out, inputs)
    if out.exists() and not overwrite:
        raise SensloraError(f"output folder {out} already exists; remove it or pass --overwrite")
    check_out_parent(out)
    return out


def check_out_parent(out: str | Path, inputs=()) -> None:
    """Fail before any work if ``out`` is no output folder or overlaps ``inputs``
    (:func:`senslora.data.guard.check_output`), or the nearest existing ancestor of ``out`` is not a
    writable folder."""
    probe = check_output(out, inputs).absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not _writable(probe):
        raise SensloraError(f"cannot write into {probe}; choose another --out")


def _writable(path: Path) -> bool:
    """Whether a folder can be created in ``path`` (tried: root passes ``os.access`` everywhere,
    and /proc or a read-only mount pass it too)."""
    import os
    import tempfile

    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".senslora-probe-", dir=path))
    except OSError:
        return False
    return True


def calibration_inputs(args: argparse.Namespace) -> list:
    """The model folder and calibration data of ``args`` as inputs for :func:`senslora.data.guard.writing`."""
    return [model_input(args.model), data_input(args.calib)]


def _device_map_file(args: argparse.Namespace) -> str | None:
    device_map = getattr(args, "device_map", None)
    return device_map if device_map not in (None, *NAMED_DEVICE_MAPS) else None


def load_model_for(args: argparse.Namespace, kind: str | None = None, **extra):
    """Model + tokenizer from the common --model/--device/--dtype/--task-kind flags."""
    from ..data.models import load_model

    kind = kind or getattr(args, "task_kind", "auto")
    num_labels = getattr(args, "num_labels", 2)
    return load_model(
        args.model, kind=kind, num_labels=num_labels, device=args.device, dtype=args.dtype, **extra
    )


def big_model_options(args: argparse.Namespace) -> dict:
    """``device_map`` / ``offload_folder`` / ``max_memory`` for :func:`senslora.data.models.load_model`."""
    device_map = getattr(args, "device_map", None)
    if device_map is None:
        for flag in ("offload_folder", "max_memory"):
            if getattr(args, flag, None) is not None:
                raise SensloraError(
                    f"--{flag.replace('_', '-')} only applies with --device-map; add --device-map auto"
                )
        return {}
    if device_map not in NAMED_DEVICE_MAPS:
        path = Path(device_map)
        if not path.is_file():
            raise SensloraError(
                f"--device-map {device_map!r} is neither auto/balanced/sequential nor a JSON file; "
                "pass one of those"
            )
        try:
            device_map = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SensloraError(f"--device-map file {path} is not valid JSON ({exc})") from None
        if not isinstance(device_map, dict) or not device_map:
            raise SensloraError(f"--device-map file {path} must hold a JSON object of module name -> device")
    options: dict = {"device_map": device_map}
    if getattr(args, "offload_folder", None) is not None:
        options["offload_folder"] = args.offload_folder
    if getattr(args, "max_memory", None) is not None:
        options["max_memory"] = parse_max_memory(args.max_memory)
    return options


def parse_max_memory(text: str) -> dict:
    """``"0=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", "cpu": "60GiB"}``."""
    out: dict = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key or not value:
            raise SensloraError(
                f"--max-memory {text!r} is not DEVICE=SIZE[,DEVICE=SIZE]; e.g. 0=20GiB,cpu=60GiB"
            )
        out[int(key) if key.isdigit() else key] = value
    return out


# The --calib flags that say how the calibration file is read (columns and format).
CALIB_READING = ("text_column", "text_pair_column", "label_column", "data_format")


def calibration_batches_for(args: argparse.Namespace, tokenizer, kind: str) -> list[dict]:
    """Seeded calibration sample from the --calib flags, tokenised into padded batches (labelled
    where the estimator or the --init needs the task loss)."""
    from ..data.examples import calibration_batches

    same = ("seed", "max_length", "batch_size", "estimator", *CALIB_READING)
    return calibration_batches(
        args.calib,
        tokenizer,
        kind,
        samples=args.calib_samples,
        # Labels are required only by an --init given on the command line: the preset's own init
        # uses them where the data has them and otherwise falls back to zero (core/pipeline.py).
        init=getattr(args, "init", None) or "zero",
        **{k: getattr(args, k) for k in same},
    )


def target_spec(args: argparse.Namespace):
    if args.targets and args.target_names:
        raise SensloraError("pass either --targets (regex) or --target-names (list), not both")
    if args.target_names:
        return [t.strip() for t in args.target_names.split(",") if t.strip()]
    return args.targets


def allocator_options(args: argparse.Namespace) -> dict:
    """The allocator flags (``add_allocator_args``) as :func:`senslora.core.pipeline.allocate` keywords;
    ``senslora train`` passes the same dict as method options."""
    from ..core.presets import RECIPE_KEYS

    # Recipe flags left unset (None) take the --preset's values inside allocate().
    return {
        "preset": args.preset,
        **{k: getattr(args, k) for k in RECIPE_KEYS},
        "categories": args.categories,
        "r_min": args.r_min,
        "r_max": args.r_max,
        "budget_mode": args.budget,
        "alpha_mode": args.alpha_mode,
        "num_probes": args.num_probes,
        "accumulate_on": args.accumulate_on,
        "init": args.init,
        "init_step": args.init_step,
        "target_modules": target_spec(args),
    }


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of ``args`` that are :class:`TrainConfig` fields (their ``dest`` is the field name)."""
    from dataclasses import fields

    names = {f.name for f in fields(TrainConfig)} - {"options"}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from the ``senslora train`` flags: one flag per field; ``options`` from
    the allocator flags, the selection flags and every ``--option KEY=VALUE``."""
    from .flags import selection_flags

    options: dict[str, Any] = {
        **allocator_options(args),
        **{flag.dest: getattr(args, flag.dest) for flag in selection_flags()},
    }
    options.update(parse_option(item) for item in args.options or [])
    return TrainConfig(**config_values(args), options=options)


def with_values(args: argparse.Namespace, **values: Any) -> argparse.Namespace:
    """A copy of ``args`` with ``values`` replaced (e.g. the estimator a preset resolves to)."""
    return argparse.Namespace(**{**vars(args), **values})


def run_allocate(args: argparse.Namespace) -> Path:
    """``senslora allocate``: estimate, allocate, write allocation.json + lora_config/ + ranks.png,
    the trainers' snippets and config.yaml (the flags it ran with).

    Under ``accelerate launch`` / ``torchrun`` every process loads the model and the same calibration
    sample, the estimation is sharded over the processes, and the main process writes the folder.
    """
    from ..core.distributed import current
    from ..core.estimators import estimator_class
    from ..core.presets import resolve
    from .configfile import CONFIG_FILE, config_yaml, recorded

    out = check_out_dir(args.out, args.overwrite, calibration_inputs(args))
    ran_with = config_yaml(recorded(args), "allocate")  # as given: --config of it repeats the run
    estimator = resolve(args.preset, estimator=args.estimator)["estimator"]
    estimator_class(estimator)  # an unknown name is an error before anything is written
    args = with_values(args, estimator=estimator)
    dist = current()
    inputs = [*calibration_inputs(args), ("the --device-map file", _device_map_file(args))]
    inputs.append(("the offload folder", getattr(args, "offload_folder", None)))
    with writing(out, inputs, lock=dist.is_main):
        return _allocate(args, out, dist, {CONFIG_FILE: ran_with})


def _allocate(args: argparse.Namespace, out: Path, dist, files: dict[str, str]) -> Path:
    from peft import LoraConfig, TaskType

    from ..core.distributed import process_device
    from ..core.estimators import estimator_class
    from ..core.inits import MUTATES_BASE
    from ..core.losses import offloaded
    from ..core.pipeline import ADAPTER_DIR, allocate
    from ..data.models import PEFT_TASK_TYPES, model_kind

    if dist.enabled:
        # One device per process (cuda:<local rank>, or the CPU under gloo).
        args = with_values(args, device=process_device(args.device, dist))
    seed_everything(args.seed)
    estimator = estimator_class(args.estimator)
    attn = "eager" if estimator.eager_attention else None
    big = big_model_options(args)
    if big and dist.enabled:
        raise SensloraError(
            "--device-map spreads one model over devices; it cannot be combined with one process per "
            "device (accelerate launch / torchrun): run a single process"
        )
    model, tokenizer = load_model_for(args, attn_implementation=attn, quantize=args.quantize, **big)
    if offloaded(model) and estimator.needs_grad:
        raise SensloraError(
            f"the {args.estimator} estimator needs a backward pass through every weight, which offloaded "
            "(cpu/disk) blocks do not support; use --estimator activation or a --device-map on GPUs only"
        )
    # Whether the init can run on this model (offloaded blocks, unlabelled batches) is allocate()'s
    # check (core.inits.init_blocker): a named init is a one-line error, the preset's own falls back.
    kind = model_kind(model)
    batches = calibration_batches_for(args, tokenizer, kind)
    with step("estimating the sensitivities and allocating the ranks", TARGETS_FIX):
        alloc = allocate(
            model,
            batches,
            avg_rank=args.avg_rank,
            lora_alpha=args.lora_alpha,
            seed=args.seed,
            progress=not args.no_progress,
            measure_forward=args.measure_forward,
            model_name=args.model,
            **allocator_options(args),
        )
    alloc.calibration["source"] = args.calib
    alloc.calibration["max_length"] = args.max_length
    peft_type = PEFT_TASK_TYPES.get(kind)  # a bare base model has none
    task_type = TaskType(peft_type) if peft_type is not None else None
    base = LoraConfig(r=max(1, round(args.avg_rank)), lora_alpha=alloc.lora_alpha, task_type=task_type)
    peft_model = None
    # No adapter/ for an init whose adapter is only valid on a changed base, nor for a model with
    # offloaded (meta) blocks, whose adapter layers cannot be materialised here: lora_config/ only.
    if alloc.init not in MUTATES_BASE and not offloaded(model):
        peft_model = alloc.to_peft_model(model, base, batches=batches)
    alloc.save(
        out,
        plot=not args.no_plot,
        base_config=base,
        overwrite=args.overwrite,
        peft_model=peft_model,
        adapter_dir=out.resolve() / ADAPTER_DIR if peft_model is not None else None,
        adapter_weights=alloc.init != "zero",
        files=files,
    )  # main only
    dist.barrier()
    if dist.is_main:
        _print_summary(alloc)
    return out


def _print_summary(alloc) -> None:
    t = alloc.timings
    ratio = ""
    if "ratio_to_forward" in t:
        ratio = f" ({t['ratio_to_forward']:.2f}x one plain forward pass of {t['forward']:.2f} s)"
    c = alloc.concentration
    print(
        f"{len(alloc.matrices)} matrices, {alloc.total_rank} ranks, {alloc.trainable_params:,} LoRA parameters "
        f"(uniform: {alloc.uniform_params:,}); allocation took {t['total']:.2f} s{ratio}"
    )
    print(
        f"recipe {alloc.recipe}: ranks {min(alloc.ranks.values())}..{max(alloc.ranks.values())} "
        f"(median {c['median_rank']:g}), top matrix {c['top_matrix_share']:.1%} and top 5% "
        f"{c['top5pct_share']:.1%} of the LoRA parameters, rank Gini {c['rank_gini']:.2f}, "
        f"{c['at_r_min']} at r_min, {c['at_r_max']} at r_max"
    )
    print(f"adapter init {alloc.init}{_init_detail(alloc)}")
    if alloc.quantized:
        print(f"allocated on the {alloc.quantized} model (bitsandbytes); axolotl.yaml and llamafactory.yaml train on it quantised")


def _init_detail(alloc) -> str:
    """How the init ran: its extra pass and seconds, or why the preset's could not."""
    if alloc.init_fallback:
        return f" (PEFT's; the {alloc.preset} preset's init could not run: {alloc.init_fallback})"
    if alloc.init_pass == "extra":
        return f" (one more forward and backward pass, {alloc.timings.get('init', 0.0):.2f} s, in the time above)"
    if alloc.init_pass == "shared":
        return " (sketched in the estimator's pass)"
    return ""


def run_layers(args: argparse.Namespace) -> Path:
    """``senslora layers``: CKA per block on the calibration set, kept blocks, cka.json + cka.png."""
    out = check_out_dir(args.out, args.overwrite, calibration_inputs(args))
    if not 0 < args.layer_ratio <= 1:
        raise SensloraError(f"--layer-ratio must be in (0, 1], got {args.layer_ratio}")
    with writing(out, calibration_inputs(args)):
        return _layers(args, out)


def _layers(args: argparse.Namespace, out: Path) -> Path:
    from ..data.models import model_kind
    from ..training.cka import select_layers_by_cka

    seed_everything(args.seed)
    model, tokenizer = load_model_for(args)
    batches = calibration_batches_for(args, tokenizer, model_kind(model))
    selection = select_layers_by_cka(
        model, batches, args.layer_ratio, token=args.token, progress=not args.no_progress
    )
    selection.save(out, overwrite=args.overwrite)
    print(f"kept blocks {selection.kept} of {selection.num_blocks} (lowest CKA)")
    return out


def run_select_data(args: argparse.Namespace) -> Path:
    """``senslora select-data``: score a task's training split and keep the best fraction."""
    out = check_out_dir(args.out, args.overwrite, [model_input(args.model), task_input(args.task)])
    if not 0 < args.data_keep <= 1:
        raise SensloraError(f"--data-keep must be in (0, 1], got {args.data_keep}")
    if args.max_length < 8:
        raise SensloraError(f"--max-length must be at least 8, got {args.max_length}")
    with writing(out, [model_input(args.model), task_input(args.task)]):
        return _select_data(args, out)


def _select_data(args: argparse.Namespace, out: Path) -> Path:
    from ..data.models import load_model
    from ..training.quality import select_training_data

    task = load_task_for(TrainConfig(**config_values(args)))  # the task flags are TrainConfig fields
    print(f"task {task.name}: {task.describe()}")
    seed_everything(args.seed)
    num_labels = task.num_labels if task.problem == "classification" else 2
    model, tokenizer = load_model(
        args.model, kind=task.model_kind, num_labels=num_labels, device=args.device, dtype=args.dtype
    )
    kept, selection = select_training_data(
        model,
        tokenizer,
        task.train,
        kind=task.model_kind,
        keep=args.data_keep,
        rule=args.rule,
        max_length=args.max_length,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    selection.save(out, overwrite=args.overwrite)
    print(f"kept {len(kept)} of {len(task.train)} training examples (rule {selection.rule})")
    return out


def run_diagnose(args: argparse.Namespace) -> Path:
    """``senslora diagnose``: where S_global sits (tokens, channels) per matrix -> diagnosis.json."""
    from ..core.cache import atomic_dir
    from ..core.diagnosis import diagnose_activation, diagnose_diagonals, summarize
    from ..core.estimators import estimate_diagonals
    from ..core.targets import find_targets
    from ..data.models import model_kind

    out = check_out_dir(args.out, args.overwrite, calibration_inputs(args))
    if not 0 < args.fraction < 1:
        raise SensloraError(f"--fraction must be in (0, 1), got {args.fraction}")
    seed_everything(args.seed)
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    unknown = sorted(set(estimators) - {"activation", "fisher"})
    if unknown or not estimators:
        raise SensloraError(f"--estimators takes activation and/or fisher, got {args.estimators!r}")
    args = with_values(args, estimator="fisher" if "fisher" in estimators else "activation")
    model, tokenizer = load_model_for(args)
    batches = calibration_batches_for(args, tokenizer, model_kind(model))
    targets = find_targets(model)
    report: dict = {"model": args.model, "calib": args.calib, "fraction": args.fraction}
    if "activation" in estimators:
        act = diagnose_activation(model, batches, targets, tokenizer=tokenizer, fraction=args.fraction)
        act["distribution"] = {
            k: summarize(act["matrices"], k)
            for k in ("top_token_share", "position0_share", "top_channel_share")
        }
        report["activation"] = act
    if "fisher" in estimators:
        diags = estimate_diagonals("fisher", model, batches, targets, progress=not args.no_progress)
        fis = {"matrices": diagnose_diagonals(diags, args.fraction)}
        traces = {n: float(d.values.double().sum()) for n, d in diags.items()}
        total = sum(traces.values()) or 1.0
        lead = sorted(traces, key=traces.get, reverse=True)[: max(1, round(0.05 * len(traces)))]
        fis["summary"] = {
            "lead_matrices": lead,
            "lead_share_of_s_global": sum(traces[n] for n in lead) / total,
        }
        fis["distribution"] = {
            k: summarize(fis["matrices"], k) for k in ("top_channel_share", "top_row_share")
        }
        report["fisher"] = fis
    with atomic_dir(out) as tmp:
        (tmp / "diagnosis.json").write_text(json.dumps(report, indent=1) + "\n")
    for name in estimators:
        s = report[name]["summary"]
        print(
            f"{name}: the top 5% of matrices hold {s['lead_share_of_s_global']:.0%} of S_global "
            f"(first: {s['lead_matrices'][0]})"
        )
    if "activation" in report:
        s = report["activation"]["summary"]
        print(
            f"activation: {s['lead_top_tokens_at_position0']:.0%} of their top {args.fraction:.0%} tokens "
            f"are the first token; most common: {[t for t, _ in s['lead_top_token_strings'][:3]]}"
        )
    return out


def run_show_data(args: argparse.Namespace) -> None:
    """``senslora show-data``: the calibration sample of the --calib flags as ``allocate`` reads and
    tokenises it (no model weights are loaded): counts, token lengths, the share of tokens the loss
    is on, and the first --examples examples with those tokens marked."""
    from ..core.losses import IGNORE_INDEX
    from ..data.batches import LOSS_CLOSE, LOSS_OPEN, make_batches, marked_text
    from ..data.examples import calibration_sample
    from ..data.models import load_tokenizer

    tokenizer, kind = load_tokenizer(args.model, kind=args.task_kind)
    reading = {k: getattr(args, k) for k in CALIB_READING}
    sample, total = calibration_sample(args.calib, samples=args.calib_samples, seed=args.seed, **reading)
    batches = make_batches(sample, tokenizer, kind=kind, max_length=args.max_length, batch_size=args.batch_size)
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(dim=1)]
    print(
        f"{args.calib}: {total} examples, {len(sample)} in the calibration sample (seed {args.seed}), "
        f"tokenised for a {kind} model by the tokenizer of {args.model}"
    )
    at_limit = sum(n >= args.max_length for n in lengths)
    print(
        f"tokens per example: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}; "
        f"{at_limit} at --max-length {args.max_length} (cut there if longer)"
    )
    if kind == "causal-lm":
        taken = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        print(f"the loss is on {taken} of {sum(lengths)} tokens ({taken / sum(lengths):.0%}), marked {LOSS_OPEN} {LOSS_CLOSE}")
    shown = 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            if shown == args.examples:
                return
            ex = sample[shown]
            label = f", label {ex.label}" if ex.label is not None else ""
            print(f"\n--- example {ex.id}{label}\n{marked_text(tokenizer, batch, row)}")
            shown += 1
