"""The configuration of a fine-tuning run: :class:`TrainConfig`, validated, saved as ``config.json``.

Every field carries its command-line help in ``metadata["help"]``; ``senslora train``'s flags are
generated from these fields (:mod:`senslora.cli.flags`). Other metadata keys, all optional:

- ``group``: the section of ``senslora train --help`` the flag is listed in;
- ``choices``: the accepted values (a registry), enforced when the flags are parsed;
- ``names``: the known values (a registry), shown with the flag; the library checks the value and
  names the alternatives itself (e.g. ``unknown method ...``);
- ``min``: ``1`` for a count, parsed as a positive integer;
- ``flag`` / ``metavar``: the flag's name and placeholder where they are not derived from the
  field (a true-by-default bool ``x`` is ``--no-x``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..core.errors import SensloraError
from ..data.formats import DATA_FORMATS
from ..data.models import DTYPES, MODEL_ALIASES
from ..data.tasks import PROBLEMS, TASKS
from .methods.base import METHODS, get_method
from .options import DATA_SELECTIONS, LAYER_SELECTIONS, check_options

EVAL_SPLITS = ("test", "validation")

# sections of `senslora train --help`
TASK, MODEL, TRAINING, ALLOCATION, SELECTION = (
    "method and task",
    "model",
    "training",
    "allocation",
    "layer and data selection",
)


def _f(default: Any, help: str, group: str = TRAINING, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **meta})


@dataclass
class TrainConfig:
    """Everything that defines a fine-tuning run (saved as ``config.json``)."""

    method: str = _f("lora", "fine-tuning method (senslora.training.methods.METHODS)", TASK, names=METHODS)
    model: str = _f(
        "minilm",
        f"offline alias ({', '.join(MODEL_ALIASES)}), a local HF model folder, a .gguf file (or a folder "
        "holding one; dequantised once into the cache), or a hub name org/name (HF cache; "
        "HF_HUB_OFFLINE is honoured)",
        MODEL,
    )
    task: str = _f(
        "movie-polarity",
        f"built-in task ({', '.join(TASKS)}) or csv:PATH, jsonl:PATH, parquet:PATH, disk:PATH, glue:NAME",
        TASK,
    )
    data_format: str = _f(
        "auto",
        "generic tasks: the rows' format (TRL's): text (text and label columns), messages (a 'messages' column of "
        "{role, content} turns) or prompt-completion ('prompt' and 'completion' columns); auto detects it "
        "from the columns",
        TASK,
        choices=DATA_FORMATS,
    )
    text_column: str = _f("text", "generic tasks: text column (the prompt for generation)", TASK)
    text_pair_column: str | None = _f(None, "generic tasks: second text column (sentence pairs)", TASK)
    label_column: str = _f("label", "generic tasks: label column (the answer for generation)", TASK)
    problem: str | None = _f(
        None, "generic tasks: problem type (default: inferred from the labels)", TASK, choices=PROBLEMS
    )
    loose_labels: bool = _f(
        False,
        "generic tasks: read a label column mixing numbers and text as class names, and merge class names "
        "differing only in case or spaces (default: both are errors naming the rows)",
        TASK,
    )
    split_seed: int = _f(0, "seed of the 80/10/10 split (independent of --seed)", TASK)
    max_train_samples: int | None = _f(
        None, "use only the first n examples of the (shuffled) train split", TASK, min=1
    )
    max_eval_samples: int | None = _f(
        None, "use only the first n examples of the validation and test splits", TASK, min=1
    )
    avg_rank: float = _f(
        4,
        "average LoRA rank (paper: 4 for NLU, 8 for NLG); the budget is uniform LoRA of this rank",
        ALLOCATION,
    )
    lora_alpha: float | None = _f(
        None, "reference LoRA alpha of the uniform run (default 2 x avg rank)", ALLOCATION
    )
    lora_dropout: float = _f(0.0, "dropout on the LoRA / adapter input")
    lr: float = _f(5e-4, "peak AdamW learning rate (paper: 5e-4)")
    batch_size: int = _f(16, "examples per optimizer step (also per evaluation batch)", min=1)
    eval_batch_size: int | None = _f(
        None, "examples per evaluation batch (default: --batch-size); larger is faster for generation", min=1
    )
    epochs: int = _f(3, "passes over the train split", min=1)
    max_length: int = _f(128, "truncate examples to this many tokens (at least 8)")
    max_new_tokens: int = _f(32, "generation tasks: tokens generated per answer at evaluation", min=1)
    warmup_ratio: float = _f(0.06, "fraction of the steps with a linear learning-rate warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay (applied to every trainable parameter)")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this value (0: no clipping)")
    seed: int = _f(0, "seed of the head / adapter initialisation, data order, dropout and calibration sample")
    calib_samples: int = _f(
        128, "calibration examples drawn from the train split (senslora, eva, cka)", min=1
    )
    save_every: int = _f(0, "write a checkpoint every n optimizer steps (0: only at each epoch end)")
    keep_checkpoints: bool = _f(False, "keep checkpoints/ after a successful run")
    eval_each_epoch: bool = _f(
        True, "run the validation pass after each epoch; --no-eval-each-epoch skips it"
    )
    eval_split: str = _f(
        "test",
        "split of the final evaluation (result.json metrics); validation for sweeps that choose "
        "settings and must not read the test split",
        choices=EVAL_SPLITS,
    )
    device: str | None = _f(None, "torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)", MODEL)
    dtype: str = _f("float32", "model dtype", MODEL, names=DTYPES)
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "method option KEY=VALUE (VALUE in JSON), repeatable: the allocator's (estimator, score, "
            "fusion, strategy, ...; the allocation flags set them), target_modules, layer_select (all|cka), "
            "layer_ratio, data_select (none|quality), data_keep (the flags above set these four), "
            "layer_budget, plot, and method-specific ones such as eva_rho",
            "group": SELECTION,
            "flag": "--option",
            "metavar": "KEY=VALUE",
        },
    )

    @property
    def resolved_lora_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * float(self.avg_rank)

    def validate(self) -> None:
        """Raise :class:`SensloraError` naming the first bad value."""

        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise SensloraError(
                    f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}"
                )

        def number(
            name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False
        ) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if open_low else value >= low) and value < high
            if not ok:
                bound = f"> {low}" if open_low else f">= {low}"
                bound += f" and < {high}" if math.isfinite(high) else ""
                raise SensloraError(f"--{name.replace('_', '-')} must be a number {bound}, got {value!r}")

        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 8:
            raise SensloraError(f"--max-length must be at least 8, got {self.max_length!r}")
        if self.eval_split not in EVAL_SPLITS:
            raise SensloraError(
                f"--eval-split must be one of {', '.join(EVAL_SPLITS)}, got {self.eval_split!r}"
            )
        for name in ("batch_size", "epochs", "max_new_tokens", "calib_samples"):
            positive_int(name, getattr(self, name))
        positive_int("save_every", self.save_every, 0)
        for name in ("max_train_samples", "max_eval_samples", "eval_batch_size"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        number("avg_rank", self.avg_rank, 0, open_low=True)
        number("lr", self.lr, 0, open_low=True)
        number("lora_dropout", self.lora_dropout, 0, 1)
        number("warmup_ratio", self.warmup_ratio, 0, 1)
        number("weight_decay", self.weight_decay, 0)
        number("max_grad_norm", self.max_grad_norm, 0)
        if self.lora_alpha is not None:
            number("lora_alpha", self.lora_alpha, 0, open_low=True)
        layer_select = self.options.get("layer_select", "all")
        if layer_select not in LAYER_SELECTIONS:
            raise SensloraError(
                f"--layers must be one of {', '.join(LAYER_SELECTIONS)}, got {layer_select!r}"
            )
        data_select = self.options.get("data_select", "none")
        if data_select not in DATA_SELECTIONS:
            raise SensloraError(
                f"--data-select must be one of {', '.join(DATA_SELECTIONS)}, got {data_select!r}"
            )
        for key, what in (("layer_ratio", "--layer-ratio"), ("data_keep", "--data-keep")):
            value = self.options.get(key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                    raise SensloraError(f"{what} must be a number in (0, 1], got {value!r}")
        try:
            json.dumps(self.options)
        except (TypeError, ValueError) as exc:
            raise SensloraError(f"method options must be JSON values ({exc})") from None
        check_options(self.options, get_method(self.method))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (what ``config.json`` holds)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones take their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
