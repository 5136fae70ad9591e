"""The ``senslora`` command line: subcommands that parse flags and call the library.

The flags that mirror :class:`senslora.training.config.TrainConfig` fields and the allocator's
flags are described once, in :mod:`senslora.cli.flags`; :mod:`senslora.cli.recipes` is the only
code that reads the parsed arguments. Every user-fixable problem ends as one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..core.errors import SensloraError, SensloraWarning, Terminated, foreign_error, raise_on_sigterm
from ..core.ranges import COUNT, SEED, Range
from .configfile import add_config_flag, expand_config
from .flags import (
    add_flags,
    allocator_flags,
    check_parsed,
    checked,
    config_fields,
    config_flags,
    number_type,
    selection_flag,
    selection_flags,
)

DEBUG_HELP = "on an error, also print the full traceback (for bug reports); or set SENSLORA_DEBUG=1"


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every flag's default, unless its help text already states it (on/off flags
    are off by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command takes ``--debug``, before or after the subcommand's name."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def number_arg(p, flag: str, rng: Range, **kwargs) -> argparse.Action:
    """A number flag parsed by :func:`senslora.cli.flags.number_type` and checked against ``rng``
    right after parsing (:func:`senslora.cli.flags.check_parsed`)."""
    return checked(p.add_argument(flag, type=number_type(rng), **kwargs), rng)


def add_model_args(p: argparse.ArgumentParser) -> None:
    add_flags(p.add_argument_group("model"), config_flags("model", "device", "dtype"))


def add_calib_args(p: argparse.ArgumentParser) -> None:
    from ..data.formats import DATA_FORMATS
    from ..data.models import KINDS

    g = p.add_argument_group("calibration data")
    g.add_argument(
        "--calib",
        default="movie",
        help="alias (movie, tweets, chat), a .txt/.csv/.jsonl/.parquet file, a `datasets` folder or hf:NAME",
    )
    g.add_argument(
        "--data-format",
        default="auto",
        choices=DATA_FORMATS,
        help="format of a file / datasets calibration set (TRL's): text, messages ({role, content} turns; "
        "the loss of the gradient estimators on assistant turns), prompt-completion, preference (DPO data: "
        "the chosen response, rejected is not read), sharegpt or alpaca (LLaMA-Factory / axolotl data); auto "
        "detects it from the columns",
    )
    g.add_argument(
        "--text-column", default="text", help="text column of a CSV/JSONL/datasets calibration set"
    )
    g.add_argument("--text-pair-column", default=None, help="second text column (sentence pairs)")
    g.add_argument(
        "--label-column", default=None, help="label column (needed by fisher/hutchinson on classifiers)"
    )
    number_arg(g, "--calib-samples", COUNT, default=128, help="number of calibration examples (seeded sample)")
    number_arg(
        g,
        "--max-length",
        config_fields()["max_length"].metadata["range"],
        default=128,
        help="truncate calibration sequences to this many tokens",
    )
    number_arg(g, "--batch-size", COUNT, default=8, help="calibration batch size")
    g.add_argument(
        "--task-kind",
        default="auto",
        choices=[k for k in KINDS if k != "base"],
        help="head to put on the model (auto: causal-lm for *ForCausalLM models, else classification)",
    )
    number_arg(
        g, "--num-labels", Range(2, integer=True), default=2, help="classes of a fresh classification head"
    )


def add_output_args(p: argparse.ArgumentParser, recipe: str, *, seed: str, main_only: bool = False) -> None:
    """The flags and the command of a subcommand whose recipe (a :mod:`senslora.cli.recipes`
    function) writes one output folder: --seed (``seed``: its help), --out, --overwrite and
    --no-progress; the command runs the recipe, then prints ``wrote OUT`` (``main_only``: in the main
    process only)."""
    number_arg(p, "--seed", SEED, default=0, help=seed)
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def command(args: argparse.Namespace) -> int:
        from ..core.distributed import current
        from . import recipes

        out = getattr(recipes, recipe)(args)
        if not main_only or current().is_main:
            print(f"wrote {out}")
        return 0

    command.__name__ = f"cmd_{recipe}"
    p.set_defaults(func=command)


def add_allocate_parser(sub) -> None:
    from ..data.models import QUANTIZE

    p = sub.add_parser(
        "allocate",
        help="estimate sensitivities on a calibration set and write per-matrix ranks + a PEFT LoraConfig",
        description="Estimate Hessian diagonals on calibration data, allocate per-matrix LoRA ranks, "
        "write allocation.json, lora_config/, adapter/ (the initialised PEFT adapter) and ranks.png into --out.",
    )
    add_config_flag(p, "allocate")
    add_model_args(p)
    g = p.add_argument_group("models larger than the GPU (accelerate big-model loading)")
    g.add_argument(
        "--device-map",
        default=None,
        help="auto, balanced, sequential, or a JSON file mapping module names to a GPU index, "
        "cpu or disk; offloaded blocks visit the GPU one at a time (activation estimator only)",
    )
    g.add_argument("--offload-folder", default=None, help="where blocks mapped to disk are stored")
    g.add_argument(
        "--max-memory", default=None, help="per-device memory caps for auto maps, e.g. 0=20GiB,cpu=60GiB"
    )
    g.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE,
        help="load the model quantised by bitsandbytes (4bit: NF4, QLoRA's base) and allocate on it; "
        "axolotl.yaml / llamafactory.yaml then train on it quantised too (needs bitsandbytes)",
    )
    add_calib_args(p)
    add_flags(p.add_argument_group("allocation"), allocator_flags())
    add_output_args(
        p, "run_allocate", seed="seed for the calibration sample, fresh heads and probes", main_only=True
    )
    p.add_argument("--no-plot", action="store_true", help="skip ranks.png")
    p.add_argument(
        "--measure-forward",
        action="store_true",
        help="first time one plain forward pass over the calibration set, and report allocation / forward",
    )


def add_train_parser(sub) -> None:
    """Every :class:`TrainConfig` field is one flag (:func:`senslora.cli.flags.config_flag`), in the
    section its metadata names; ``options`` is filled by the allocation flags (the section of
    ``avg_rank`` and ``lora_alpha``), the selection flags and ``--option``."""
    from ..training.config import ALLOCATION, MODEL, SELECTION, TASK, TRAINING
    from ..training.methods import load_all

    load_all()  # the method registry, listed with --method
    p = sub.add_parser(
        "train",
        help="fine-tune a model on a task with one method, evaluate it and write a run folder",
        description="Allocate (senslora), fine-tune, evaluate on the held-out test split and write result.json, "
        "adapter/, splits.json and checkpoints into --out.",
    )
    add_config_flag(p, "train")
    for title in (TASK, MODEL, TRAINING, ALLOCATION, SELECTION):
        names = [name for name, f in config_fields().items() if f.metadata["group"] == title]
        if title == ALLOCATION:
            flags = allocator_flags(budget_default="params")  # avg_rank and lora_alpha among them
        else:
            flags = config_flags(*names)
        if title == SELECTION:
            flags = [*selection_flags(), *flags]  # options: their keys, then --option
        add_flags(p.add_argument_group(title), flags)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..core.distributed import current
    from ..data.guard import model_input, task_input
    from ..training.train import train
    from .recipes import check_out_parent, config_from_args

    check_out_parent(args.out, [model_input(args.model), task_input(args.task)])
    result = train(
        config_from_args(args),
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if not current().is_main:
        return 0  # the main process reports
    shown = ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items())
    step = result["step_time_median_s"]
    warned = "".join(f"; WARNING: {w}" for w in result.get("warnings", []))
    print(
        f"{result['method']} on {result['task']} ({result['labels']}): {result['split']} {shown}; "
        f"{result['trainable_params']:,} trainable adapter parameters; {result['steps']} steps"
        + (f", {step:.3f} s/step (median)" if step is not None else "")
        + warned
    )
    print(f"wrote {args.out}")
    return 0


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="reload a run folder's model and adapter and recompute its test metrics",
        description="Reload the base model and the trained adapter of RUN_DIR, recompute the test metrics and "
        "compare them with result.json; --merge also writes a merged Hugging Face model folder.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `senslora train`")
    p.add_argument(
        "--merge", default=None, metavar="OUT", help="write the merged model (and tokenizer) into OUT"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --merge folder")
    p.add_argument("--device", default=None, help="torch device (default: the run's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..training.train import evaluate_run

    out = evaluate_run(
        args.run_dir,
        merge_to=args.merge,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.no_progress,
    )
    print(", ".join(f"{k}={v:.4f}" for k, v in out["metrics"].items()))
    if out["merged"]:
        print(f"wrote merged model {out['merged']}")
    if not out["reproduced"]:
        print("senslora: warning: the metrics differ from result.json", file=sys.stderr)
        return 1
    print("metrics reproduce result.json")
    return 0


def add_layers_parser(sub) -> None:
    from ..training.cka import TOKEN_CHOICES

    p = sub.add_parser(
        "layers",
        help="which blocks change their input most (linear CKA, as in the layer-wise LoRA with CKA paper)",
        description="Linear CKA between the input and output hidden states of every block over the "
        "calibration set; keeps the floor(ratio x L) blocks with the lowest CKA. Writes cka.json and cka.png.",
    )
    add_model_args(p)
    add_calib_args(p)
    selection_flag("layer_ratio").add_to(p)
    p.add_argument(
        "--token",
        default="auto",
        choices=TOKEN_CHOICES,
        help="token per example (auto: first for encoders, last non-pad for decoders)",
    )
    add_output_args(p, "run_layers", seed="seed of the calibration sample")
    p.set_defaults(estimator="activation")


def add_diagnose_parser(sub) -> None:
    p = sub.add_parser(
        "diagnose",
        help="where each matrix's sensitivity comes from (tokens, channels) -> diagnosis.json",
        description="Split every target matrix's activation trace S_global over calibration tokens and "
        "input channels (share of the top 1%, share of each sequence's first token, leading channels and "
        "token strings), and the per-example Fisher diagonal over channels and rows.",
    )
    add_model_args(p)
    add_calib_args(p)
    p.add_argument(
        "--estimators", default="activation,fisher", help="comma list: activation, fisher (default both)"
    )
    number_arg(
        p,
        "--fraction",
        Range(0, 1, low_open=True, high_open=True, text="in (0, 1)"),
        default=0.01,
        help="top fraction of tokens / channels (default 0.01)",
    )
    add_output_args(p, "run_diagnose", seed="seed of the calibration sample")


def add_show_data_parser(sub) -> None:
    p = sub.add_parser(
        "show-data",
        help="how a calibration set is read and tokenised, with the tokens the loss is on marked",
        description="Read --calib as allocate reads it (format detection, the seeded sample) and tokenise it "
        "with the model's tokenizer (its weights are not loaded); print the counts, the token lengths, the "
        "share of tokens the loss is on, and the first examples with those tokens between \u27e6 \u27e7.",
    )
    add_flags(p.add_argument_group("model"), config_flags("model"))
    add_calib_args(p)
    number_arg(p, "--examples", Range(0, integer=True), default=2, help="examples to print")
    number_arg(p, "--seed", SEED, default=0, help="seed of the calibration sample")
    p.set_defaults(func=cmd_show_data)


def cmd_show_data(args: argparse.Namespace) -> int:
    from .recipes import run_show_data

    run_show_data(args)
    return 0


def add_select_data_parser(sub) -> None:
    from ..training.quality import RULES

    p = sub.add_parser(
        "select-data",
        help="data-quality selection of a task's training split (our reading of the TsqLoRA paper)",
        description="Score every training example with the frozen base model (per-example loss; for "
        "prompt/answer data the instruction-following difficulty), drop empty and duplicate items, keep "
        "the best fraction. Writes scores.jsonl, selection.json and scores.png.",
    )
    add_model_args(p)
    g = p.add_argument_group("task")
    task = "task data_format text_column text_pair_column label_column problem loose_labels allow_label_text split_seed"
    task += " max_train_samples"
    add_flags(g, config_flags(*task.split(), "max_length"))
    number_arg(g, "--batch-size", COUNT, default=16, help="examples per scoring batch")
    selection_flag("data_keep").add_to(p)
    p.add_argument("--rule", default="auto", metavar="{" + ",".join(RULES) + "}", help="scoring rule")
    add_output_args(p, "run_select_data", seed="seed of the fresh head of a classifier")


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark config (methods x tasks x seeds); finished runs are skipped",
        description="Run every pending run of a benchmark YAML, each in its own process, writing "
        "OUT/runs/<experiment>/<run>/result.json. Rerunning resumes; failed runs are retried.",
    )
    p.add_argument("config", help="benchmark YAML, e.g. benchmarks/quick.yaml")
    add_config_flag(p, "bench")
    p.add_argument("--out", required=True, help="results folder, e.g. results/quick")
    p.add_argument("--only", default=None, help="regex: run only matching experiment/run ids")
    number_arg(
        p,
        "--timeout",
        Range(0, text="a number of seconds >= 0 (0: no limit)"),
        default=3600,
        help="seconds before one run is stopped and marked failed (0: no limit)",
    )
    p.add_argument("--dry-run", action="store_true", help="list pending runs without running them")
    p.add_argument("--report", action="store_true", help="write RESULTS.md afterwards")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.harness import run_benchmark
    from ..bench.report import build_report

    counts = run_benchmark(args.config, args.out, only=args.only, timeout=args.timeout, dry_run=args.dry_run)
    extra = "".join(f", {counts[k]} {k}" for k in ("reused", "stale") if counts.get(k))
    print(f"{counts['ok']} ok{extra}, {counts['failed']} failed, {counts['skipped']} already done")
    if args.report and not args.dry_run:
        print(f"wrote {build_report(args.out, command=f'senslora bench {args.config} --out {args.out}')}")
    return 1 if counts["failed"] else 0


def add_fetch_parser(sub) -> None:
    p = sub.add_parser(
        "fetch",
        help="fetch the offline data sets into the cache (scripts/setup.sh runs it; nothing downloads later)",
        description="Put the VADER ground truth (movie, tweets) into the cache ($SENSLORA_CACHE or "
        "~/.cache/senslora), from the SHA-256-checked vaderSentiment source tarball that pip downloads "
        "(or --from a copy on disk). Does nothing when the data is already there and intact.",
    )
    p.add_argument(
        "--from", dest="source", default=None, metavar="TARBALL", help="a vaderSentiment-3.3.2.tar.gz on disk"
    )
    p.add_argument("--force", action="store_true", help="fetch again even if the data is there")
    p.set_defaults(func=cmd_fetch)


def cmd_fetch(args: argparse.Namespace) -> int:
    from ..data.examples import fetch_vader

    print(f"VADER data ready in {fetch_vader(args.source, force=args.force)}")
    return 0


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="tables and plots from a benchmark's result files -> RESULTS.md")
    p.add_argument("results", help="a folder written by `senslora bench`")
    p.add_argument(
        "--readme",
        default=None,
        help="also write the headline tables into this markdown file, between its "
        "`<!-- senslora report RESULTS -->` and `<!-- /senslora report -->` markers",
    )
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from ..bench.report import build_report

    print(f"wrote {build_report(args.results, readme=args.readme)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="senslora", description="Sensitivity-LoRA: sensitivity-based LoRA rank allocation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    add_allocate_parser(sub)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_layers_parser(sub)
    add_select_data_parser(sub)
    add_diagnose_parser(sub)
    add_show_data_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    add_fetch_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging
    import os

    # transformers' load reports and per-tensor loading bars drown the CLI's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes (PEFT imports it where installed) reports at import that its optional CPU kernel
    # could not be fetched from the hub; it falls back to its own, and the line is noise here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = expand_config(parser, argv)
    except SensloraError as exc:
        print(f"senslora: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("SENSLORA_DEBUG", "") not in ("", "0")
    _show_warnings()
    raise_on_sigterm()
    try:
        check_parsed(parser, args)  # every number flag against its declared range, before any work
        return int(args.func(args) or 0)
    except Terminated:
        print("senslora: terminated (SIGTERM); checkpoints are kept, rerun with --resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("senslora: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        line = _error_line(exc, args)
        if line is None:
            raise
        if debug:
            import traceback

            traceback.print_exc()
        print(f"senslora: error: {line}", file=sys.stderr)
        return 2


def _error_line(exc: Exception, args: argparse.Namespace) -> str | None:
    """The one line a failed subcommand ends with, or None for a bug of senslora (its traceback
    is shown): the user's error, a failed write of the output, or an exception of a library or the
    OS inside a step (:func:`senslora.core.errors.foreign_error`)."""
    if isinstance(exc, SensloraError):
        return str(exc)
    if isinstance(exc, PermissionError):
        return f"cannot write {exc.filename}: permission denied; choose another --out"
    problem = _write_failure(exc)
    if problem is not None:
        # The output folder, not the temporary file that failed (it has been removed).
        where = getattr(args, "out", None) or getattr(args, "results", None)
        where = f" writing {where}" if where else ""
        return f"{problem}{where}; free space or choose another output folder"
    return foreign_error(exc, f"senslora {args.command}")


def _show_warnings() -> None:
    """senslora's own warnings (dropped rows, truncated texts, a stale lock taken over, and the
    library's :class:`SensloraWarning`: a preset's init that fell back, a concentrated allocation)
    as ``senslora: warning: ...`` lines on stderr. Other libraries' warnings keep Python's format."""
    import logging
    import warnings

    shown = warnings.showwarning
    if not getattr(shown, "senslora", False):

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, SensloraWarning):
                print(f"senslora: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        show.senslora = True
        warnings.showwarning = show

    class StderrHandler(logging.StreamHandler):
        @property
        def stream(self):  # the stderr of the moment (tests and callers may replace it)
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger("senslora")
    if not any(type(h).__name__ == "StderrHandler" for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("senslora: warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False


def _write_failure(exc: BaseException) -> str | None:
    """A short reason if ``exc`` (or an exception it chains) is a failed write of the output: a full
    or read-only disk. Writers in C (safetensors, ``torch.save``) raise their own exception types."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on device"
        if isinstance(exc, OSError) and exc.errno == errno.EROFS:
            return "read-only file system"
        if "No space left on device" in text or "os error 28" in text:
            return "no space left on device"
        if type(exc).__name__ == "SafetensorError" and "while serializing" in text:
            return f"cannot write a checkpoint ({text.splitlines()[0]})"
        if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "unexpected pos" in text):
            return "cannot write a checkpoint (torch.save failed; is the disk full?)"
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
