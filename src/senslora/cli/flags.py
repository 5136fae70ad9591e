"""Command-line flags described once: generated from :class:`senslora.training.config.TrainConfig`'s
fields (help in ``metadata["help"]``), or from the allocator's table below.

Why a small generator over :func:`dataclasses.fields` and not transformers' ``HfArgumentParser``:
``HfArgumentParser`` is a parser of its own (it cannot add one verb's flags to a subcommand of
``senslora``), turns bools into ``--flag [BOOL]`` options, has no place for the parse-time checks
the CLI makes (positive counts, finite numbers), and cannot express ``options`` (a dict filled from
``--option KEY=VALUE`` and the allocation / selection flags). What it would do for us, a flag per
field with the field's help, default and choices, is the few lines of :func:`config_flag`.

Every flag here has ``dest`` equal to the keyword it fills: a :class:`TrainConfig` field, an
``options`` key (``--layers`` -> ``layer_select``) or an allocator keyword.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from ..core.ranges import Range


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


Check = Callable[[str, Any], None]  # (flag, value) -> None, or a one-line SensloraError


def checked(action: argparse.Action, check: Check | Range) -> argparse.Action:
    """Attach ``check`` (a :class:`Range`, or a callable ``(flag, value)`` raising
    :class:`SensloraError`) to a flag; :func:`check_parsed` runs it on the parsed value."""
    action.check = check.check if isinstance(check, Range) else check  # type: ignore[attr-defined]
    action.range = check if isinstance(check, Range) else None  # type: ignore[attr-defined]
    return action


def number_type(rng: Range) -> Callable[[str], Any]:
    """What the parser converts a number flag with ``rng`` with: a positive, or any, integer, or a
    finite float (the range itself is checked after parsing, naming the flag)."""
    if rng.integer:
        return positive_int if rng.low >= 1 else int
    return finite_float


def parsed_actions(parser: argparse.ArgumentParser, command: str | None) -> list[argparse.Action]:
    """The flags of ``parser`` and of its subcommand ``command``."""
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            actions += action.choices[command]._actions
    return actions


def check_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Run the check attached (:func:`checked`) to every flag of ``parser`` and of the subcommand
    ``args`` chose on its parsed value (every value of a repeated flag); unset (None) flags pass."""
    for action in parsed_actions(parser, getattr(args, "command", None)):
        check = getattr(action, "check", None)
        value = getattr(args, action.dest, None)
        if check is None or value is None:
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        for item in value if isinstance(value, list) else [value]:
            check(flag, item)


@dataclass(frozen=True)
class Flag:
    """One flag. ``kind``: ``str``, ``int``, ``float``, ``bool`` (on/off; ``--no-x`` when on by
    default) or ``list`` (repeatable). ``choices`` are enforced by the parser; ``names`` are only
    shown (the library checks the value and names the alternatives itself). ``range`` (numbers) or
    ``check`` (a callable raising :class:`SensloraError`) is checked right after parsing."""

    dest: str
    help: str
    kind: type = str
    default: Any = None
    choices: Collection | None = None
    names: Collection | None = None
    positive: bool = False
    flag: str | None = None
    metavar: str | None = None
    range: Range | None = None
    check: Check | None = None

    def add_to(self, group) -> argparse.Action:
        dashed = self.dest.replace("_", "-")
        flag = self.flag or (f"--no-{dashed}" if self.kind is bool and self.default else f"--{dashed}")
        kwargs: dict[str, Any] = {"dest": self.dest, "default": self.default, "help": self.help}
        if self.kind is bool:
            kwargs["action"] = "store_false" if self.default else "store_true"
        elif self.kind is list:
            kwargs["action"] = "append"
        elif self.range is not None:
            kwargs["type"] = number_type(self.range)
        elif self.kind in (int, float):
            kwargs["type"] = finite_float if self.kind is float else positive_int if self.positive else int
        if self.choices is not None:
            kwargs["choices"] = list(self.choices)
        if self.names is not None:
            kwargs["metavar"] = "{" + ",".join(self.names) + "}"
        if self.metavar is not None:
            kwargs["metavar"] = self.metavar
        action = group.add_argument(flag, **kwargs)
        if self.range is not None or self.check is not None:
            checked(action, self.range or self.check)
        return action


def add_flags(group, flags) -> None:
    for flag in flags:
        flag.add_to(group)


# ------------------------------------------------------------------------- TrainConfig's fields
def _kind(annotation: Any) -> type:
    """``str | None`` -> ``str``; ``dict[str, Any]`` (``options``, filled from repeated flags) -> ``list``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return list if typing.get_origin(annotation) is dict else annotation


def config_fields() -> dict[str, dataclasses.Field]:
    from ..training.config import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def config_flag(name: str) -> Flag:
    """The flag of :class:`TrainConfig` field ``name``: its help, default, choices from metadata."""
    from ..training.config import TrainConfig

    f = config_fields()[name]
    meta = f.metadata
    return Flag(
        name,
        meta["help"],
        kind=_kind(typing.get_type_hints(TrainConfig)[name]),
        default=None if f.default is dataclasses.MISSING else f.default,
        choices=meta.get("choices"),
        names=meta.get("names"),
        flag=meta.get("flag"),
        metavar=meta.get("metavar"),
        range=meta.get("range"),
    )


def config_flags(*names: str) -> list[Flag]:
    return [config_flag(name) for name in names]


def selection_flags() -> list[Flag]:
    """The ``senslora train`` flags that set layer / data selection options (``options[dest]``);
    ``layers`` and ``select-data`` take ``layer_ratio`` / ``data_keep`` too."""
    from ..training.config import DATA_SELECTIONS, LAYER_SELECTIONS, SHARE

    return [
        Flag("layer_select", "adapt all blocks, or the blocks CKA selects", flag="--layers",
             default=LAYER_SELECTIONS[0], choices=LAYER_SELECTIONS),
        Flag("layer_ratio", "cka: fraction of blocks kept, in (0, 1]", float, 0.5, range=SHARE),
        Flag("data_select", "train on all data, or the best fraction by quality",
             default=DATA_SELECTIONS[0], choices=DATA_SELECTIONS),
        Flag("data_keep", "quality: fraction of train examples kept, in (0, 1]", float, 0.5, range=SHARE),
    ]  # fmt: skip


def selection_flag(dest: str) -> Flag:
    return next(flag for flag in selection_flags() if flag.dest == dest)


# ------------------------------------------------------------------------------- the allocator
def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _preset_default(key: str) -> str:
    """`` (default X)`` for a recipe flag: the default preset's value, and each preset's where they differ."""
    from ..core.presets import DEFAULT_PRESET, PRESETS

    values = {name: recipe[key] for name, recipe in PRESETS.items()}
    if len(set(map(_shown, values.values()))) == 1:
        return f" (default {_shown(values[DEFAULT_PRESET])})"
    return " (default: the preset's; " + ", ".join(f"{n}: {_shown(v)}" for n, v in values.items()) + ")"


def allocator_flags(budget_default: str = "rank") -> list[Flag]:
    """The allocation flags of ``allocate`` and ``train``: ``avg_rank`` / ``lora_alpha`` from
    :class:`TrainConfig`, the rest :func:`senslora.core.pipeline.allocate` keywords (``dest``; its
    defaults; ``budget``, ``targets`` and ``target_names`` map onto ``budget_mode`` / ``target_modules``).
    ``budget_default``: ``rank`` for ``allocate`` (the paper's budget), ``params`` for ``train``
    (methods are compared at equal trainable parameters)."""
    import inspect

    from ..core.allocation import STRATEGIES
    from ..core.config import AllocationConfig
    from ..core.diagonal import SALIENCIES
    from ..core.estimators import ACCUMULATE_ON, ESTIMATORS, SINK_MODES
    from ..core.inits import INITS
    from ..core.metrics import FUSIONS, SCORES
    from ..core.peft_bridge import ALPHA_MODES
    from ..core.pipeline import BUDGET_MODES, allocate
    from ..core.presets import DEFAULT_PRESET, PRESET_INITS, PRESETS, check_value
    from ..core.shaping import NORMALIZE

    keyword = {k: p.default for k, p in inspect.signature(allocate).parameters.items()}
    ranges = {f.name: f.metadata.get("range") for f in dataclasses.fields(AllocationConfig)}

    def recipe(key: str, help: str, kind: type = str, **kw: Any) -> Flag:
        # numbers: checked against the recipe table (senslora.core.presets) right after parsing;
        # names and choices as the other flags' (the library names the alternatives)
        check = (lambda flag, v: check_value(key, v)) if kind is float else None
        return Flag(key, help + _preset_default(key), kind, check=check, **kw)

    def own(key: str, help: str, kind: type = str, **kw: Any) -> Flag:
        return Flag(key, help, kind, keyword[key], range=ranges.get(key), **kw)

    return [
        config_flag("avg_rank"),
        Flag("preset", "allocation recipe: robust (chosen on validation data; docs/METHOD-NOTES.md) or paper "
             f"(Sensitivity-LoRA as published); the flags below override it (default {DEFAULT_PRESET})",
             choices=PRESETS),
        recipe("estimator", "Hessian-diagonal estimator", names=ESTIMATORS),
        recipe("sink", "activation: drop each sequence's first token (decoders' attention sink, massive "
               "activations) or keep it", choices=SINK_MODES),
        recipe("token_trim", "activation: leave out this fraction of each batch's highest-energy tokens, "
               "in [0, 0.5)", float),
        recipe("saliency", "hessian: h_ij (paper); obd: h_ij * w_ij^2, Optimal Brain Damage", choices=SALIENCIES),
        recipe("score", "allocation weight: the fused score (the paper's) or one metric", choices=SCORES),
        recipe("fusion", "metric weights: sigma/mu^2 (paper) or 0.5/mu", choices=FUSIONS),
        recipe("strategy", "SRA (proportional) or PRA (rank categories)", choices=STRATEGIES),
        recipe("temperature", "allocate by theta^T, T in (0, 1]; 1 is the paper's proportional rule", float),
        recipe("normalize", "role: compare each matrix only with the same role in other layers (q with q, "
               "down with down)", choices=NORMALIZE),
        recipe("rho", "cap every rank at rho x the average rank (EVA's rule), >= 1; 0: no cap", float),
        own("categories", "PRA: number of rank categories", int),
        recipe("topk_fraction", "Top-k: k = fraction x N", float),
        recipe("alpha", "Effective Rank energy threshold", float),
        own("r_min", "smallest rank per matrix (0 drops matrices)", int),
        own("r_max", "largest rank per matrix (default min(d_in, d_out))", int),
        Flag("budget", f"hold the rank sum or the parameter count fixed (default {budget_default})",
             default=budget_default, choices=BUDGET_MODES),
        Flag("targets", "regex selecting target modules by full name (default: all linears in blocks)"),
        Flag("target_names", "comma-separated module names or name suffixes (instead of --targets)"),
        config_flag("lora_alpha"),
        own("alpha_mode", "how per-matrix alpha follows the rank", choices=ALPHA_MODES),
        own("num_probes", "hutchinson: Rademacher probes per batch", int),
        own("accumulate_on", "where fp32 accumulators live", choices=ACCUMULATE_ON),
        own("init", "adapter initialisation on the allocated ranks: zero (PEFT's, B = 0), gradient "
            "(ours: B from the calibration gradient, W unchanged), or PEFT's pissa, olora, corda, eva, "
            "lora-ga (docs/METHOD-NOTES.md); default: the --preset's ("
            + ", ".join(f"{p}: {i}" for p, i in PRESET_INITS.items())
            + "; the preset's falls back to zero, with a warning, where it cannot run)", choices=INITS),
        own("init_step", "gradient init: entry size of the initial update (a normalised gradient step), > 0", float),
    ]  # fmt: skip
