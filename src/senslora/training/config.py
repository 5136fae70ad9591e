"""The configuration of a fine-tuning run: :class:`TrainConfig`, validated, saved as ``config.json``.

Every field carries its command-line help in ``metadata["help"]``; ``senslora train``'s flags are
generated from these fields (:mod:`senslora.cli.flags`). Other metadata keys, all optional:

- ``group``: the section of ``senslora train --help`` the flag is listed in;
- ``choices``: the accepted values (a registry), enforced when the flags are parsed;
- ``names``: the known values (a registry), shown with the flag; the library checks the value and
  names the alternatives itself (e.g. ``unknown method ...``);
- ``range``: the :class:`~senslora.core.ranges.Range` a number accepts (integer or not, bounds),
  checked by :meth:`TrainConfig.validate` and by the CLI right after parsing; a count
  (``COUNT``) is parsed as a positive integer;
- ``flag`` / ``metavar``: the flag's name and placeholder where they are not derived from the
  field (a true-by-default bool ``x`` is ``--no-x``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..core.errors import SensloraError
from ..core.ranges import COUNT, SEED, Range, check_fields
from ..data.formats import DATA_FORMATS
from ..data.models import DTYPES, MODEL_ALIASES, resolve_dtype
from ..data.tasks import PROBLEMS, TASKS
from .methods.base import METHODS, get_method
from .options import DATA_SELECTIONS, LAYER_SELECTIONS, check_options

EVAL_SPLITS = ("test", "validation")
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
NONNEGATIVE = Range(0)
SHARE = Range(0, 1, low_open=True, text="in (0, 1]")  # --layer-ratio, --data-keep

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
        "{role, content} turns), prompt-completion ('prompt' and 'completion' columns) or preference "
        "('chosen' and 'rejected', optional 'prompt'; trains on the chosen response), sharegpt ('conversations') or "
        "alpaca ('instruction' and 'output'); auto detects it from the columns",
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
    allow_label_text: bool = _f(
        False,
        "generic tasks: only warn when the texts equal their labels in most rows (default: an error, the "
        "text column looks like a copy of the labels and the model would read the answer)",
        TASK,
    )
    split_seed: int = _f(0, "seed of the 80/10/10 split (independent of --seed)", TASK, range=SEED)
    max_train_samples: int | None = _f(
        None, "use only the first n examples of the (shuffled) train split", TASK, range=COUNT
    )
    max_eval_samples: int | None = _f(
        None, "use only the first n examples of the validation and test splits", TASK, range=COUNT
    )
    avg_rank: float = _f(
        4,
        "average LoRA rank (paper: 4 for NLU, 8 for NLG); the budget is uniform LoRA of this rank",
        ALLOCATION,
        range=POSITIVE,
    )
    lora_alpha: float | None = _f(
        None, "reference LoRA alpha of the uniform run (default 2 x avg rank)", ALLOCATION, range=POSITIVE
    )
    lora_dropout: float = _f(0.0, "dropout on the LoRA / adapter input", range=FRACTION)
    lr: float = _f(5e-4, "peak AdamW learning rate (paper: 5e-4)", range=POSITIVE)
    batch_size: int = _f(16, "examples per optimizer step (also per evaluation batch)", range=COUNT)
    eval_batch_size: int | None = _f(
        None,
        "examples per evaluation batch (default: --batch-size); larger is faster for generation",
        range=COUNT,
    )
    epochs: int = _f(3, "passes over the train split", range=COUNT)
    max_length: int = _f(
        128, "truncate examples to this many tokens (at least 8)", range=Range(8, integer=True, text="at least 8")
    )
    max_new_tokens: int = _f(32, "generation tasks: tokens generated per answer at evaluation", range=COUNT)
    warmup_ratio: float = _f(0.06, "fraction of the steps with a linear learning-rate warm-up", range=FRACTION)
    weight_decay: float = _f(0.0, "AdamW weight decay (applied to every trainable parameter)", range=NONNEGATIVE)
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this value (0: no clipping)", range=NONNEGATIVE)
    seed: int = _f(
        0, "seed of the head / adapter initialisation, data order, dropout and calibration sample", range=SEED
    )
    calib_samples: int = _f(
        128, "calibration examples drawn from the train split (senslora, eva, cka)", range=COUNT
    )
    save_every: int = _f(
        0, "write a checkpoint every n optimizer steps (0: only at each epoch end)", range=Range(0, integer=True)
    )
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
        check_fields(self)  # every value against the range / choices / type its field declares
        resolve_dtype(self.dtype)  # its names are shown; the loader's aliases (bf16, ...) pass too
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
            if self.options.get(key) is not None:
                SHARE.check(what, self.options[key])
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
