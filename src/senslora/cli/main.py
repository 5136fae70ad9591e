"""The ``senslora`` command line: subcommands that parse flags and call the library.

Every user-fixable problem ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..core.errors import SensloraError, Terminated, raise_on_sigterm

LOOSE_HELP = (
    "generic tasks: read a label column mixing numbers and text as class names, and merge class names "
    "differing only in case or spaces (default: both are errors naming the rows)"
)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every flag's default, unless its help text already states it (on/off flags
    are off by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="minilm",
        help="offline alias (minilm, smollm2), a local HF model folder, a .gguf file (or a folder holding one; "
        "dequantised once into the cache), or a hub name org/name (HF cache; HF_HUB_OFFLINE is honoured)",
    )
    g.add_argument(
        "--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)"
    )
    g.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 or auto")


def add_calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument(
        "--calib",
        default="movie",
        help="alias (movie, tweets, chat) or a .txt/.csv/.jsonl file or a `datasets` folder",
    )
    g.add_argument(
        "--text-column", default="text", help="text column of a CSV/JSONL/datasets calibration set"
    )
    g.add_argument("--text-pair-column", default=None, help="second text column (sentence pairs)")
    g.add_argument(
        "--label-column", default=None, help="label column (needed by fisher/hutchinson on classifiers)"
    )
    g.add_argument(
        "--calib-samples",
        type=_positive_int,
        default=128,
        help="number of calibration examples (seeded sample)",
    )
    g.add_argument(
        "--max-length", type=int, default=128, help="truncate calibration sequences to this many tokens"
    )
    g.add_argument("--batch-size", type=_positive_int, default=8, help="calibration batch size")
    g.add_argument(
        "--task-kind",
        default="auto",
        choices=["auto", "classification", "regression", "causal-lm"],
        help="head to put on the model (auto: causal-lm for *ForCausalLM models, else classification)",
    )
    g.add_argument(
        "--num-labels", type=_positive_int, default=2, help="classes of a fresh classification head"
    )


def add_allocator_args(p: argparse.ArgumentParser, *, budget_default: str = "rank") -> None:
    """Allocator flags. ``budget_default``: ``rank`` for ``allocate`` (the paper's budget), ``params``
    for ``train`` (methods are compared at equal trainable parameters)."""
    from ..core.diagonal import SALIENCIES
    from ..core.estimators import SINK_MODES
    from ..core.metrics import FUSIONS, SCORES
    from ..core.peft_bridge import ALPHA_MODES
    from ..core.pipeline import BUDGET_MODES, STRATEGIES
    from ..core.presets import DEFAULT_PRESET, PRESETS
    from ..core.shaping import NORMALIZE

    g = p.add_argument_group("allocation")
    g.add_argument(
        "--avg-rank", type=_finite_float, default=4, help="average LoRA rank (paper: 4 for NLU, 8 for NLG)"
    )
    g.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help=f"allocation recipe: robust (chosen on validation data; docs/METHOD-NOTES.md) "
        f"or paper (Sensitivity-LoRA as published); the flags below override it (default {DEFAULT_PRESET})",
    )
    g.add_argument(
        "--estimator",
        default=None,
        help="Hessian-diagonal estimator: activation, fisher, fisher-batch, hutchinson (default: the preset's, activation)",
    )
    g.add_argument(
        "--sink",
        default=None,
        choices=SINK_MODES,
        help="activation: drop each sequence's first token (decoders' attention sink, massive "
        "activations) or keep it (default: the preset's, keep for both)",
    )
    g.add_argument(
        "--token-trim",
        type=_finite_float,
        default=None,
        help="activation: leave out this fraction of each batch's highest-energy tokens, in [0, 0.5) (default 0)",
    )
    g.add_argument(
        "--saliency",
        default=None,
        choices=SALIENCIES,
        help="hessian: h_ij (paper); obd: h_ij * w_ij^2, Optimal Brain Damage (default hessian)",
    )
    g.add_argument(
        "--score", default=None, choices=SCORES, help="allocation weight (default fused, the paper's)"
    )
    g.add_argument(
        "--fusion",
        default=None,
        choices=list(FUSIONS),
        help="metric weights: sigma/mu^2 (paper, default) or 0.5/mu",
    )
    g.add_argument(
        "--strategy",
        default=None,
        choices=STRATEGIES,
        help="SRA (proportional, default) or PRA (rank categories)",
    )
    g.add_argument(
        "--temperature",
        type=_finite_float,
        default=None,
        help="allocate by theta^T, T in (0, 1]; 1 is the paper's proportional rule (default 1)",
    )
    g.add_argument(
        "--normalize",
        default=None,
        choices=NORMALIZE,
        help="role: compare each matrix only with the same role in other layers (q with q, down with "
        "down) (default none)",
    )
    g.add_argument(
        "--rho",
        type=_finite_float,
        default=None,
        help="cap every rank at rho x the average rank (EVA's rule), >= 1; 0: no cap "
        "(default: the preset's; robust: 2, paper: 0)",
    )
    g.add_argument("--categories", type=_positive_int, default=3, help="PRA: number of rank categories")
    g.add_argument(
        "--topk-fraction", type=_finite_float, default=None, help="Top-k: k = fraction x N (default 0.5)"
    )
    g.add_argument(
        "--alpha", type=_finite_float, default=None, help="Effective Rank energy threshold (default 0.85)"
    )
    g.add_argument("--r-min", type=int, default=1, help="smallest rank per matrix (0 drops matrices)")
    g.add_argument(
        "--r-max", type=int, default=None, help="largest rank per matrix (default min(d_in, d_out))"
    )
    g.add_argument(
        "--budget",
        default=budget_default,
        choices=BUDGET_MODES,
        help=f"hold the rank sum or the parameter count fixed (default {budget_default})",
    )
    g.add_argument(
        "--targets",
        default=None,
        help="regex selecting target modules by full name (default: all linears in blocks)",
    )
    g.add_argument(
        "--target-names",
        default=None,
        help="comma-separated module names or name suffixes (instead of --targets)",
    )
    g.add_argument(
        "--lora-alpha",
        type=_finite_float,
        default=None,
        help="reference LoRA alpha of the uniform run (default 2 x avg rank)",
    )
    g.add_argument(
        "--alpha-mode",
        default="proportional",
        choices=ALPHA_MODES,
        help="how per-matrix alpha follows the rank",
    )
    g.add_argument(
        "--num-probes", type=_positive_int, default=1, help="hutchinson: Rademacher probes per batch"
    )
    g.add_argument(
        "--accumulate-on", default="cpu", choices=["cpu", "device"], help="where fp32 accumulators live"
    )


def cmd_allocate(args: argparse.Namespace) -> int:
    from ..core.distributed import current
    from .recipes import run_allocate

    out = run_allocate(args)
    if current().is_main:
        print(f"wrote {out}")
    return 0


def add_generic_task_args(g) -> None:
    """The columns and problem type of a user's task file (``csv:``, ``jsonl:``, ``disk:``)."""
    g.add_argument(
        "--text-column", default="text", help="generic tasks: text column (the prompt for generation)"
    )
    g.add_argument(
        "--text-pair-column", default=None, help="generic tasks: second text column (sentence pairs)"
    )
    g.add_argument(
        "--label-column", default="label", help="generic tasks: label column (the answer for generation)"
    )
    g.add_argument(
        "--problem",
        default=None,
        choices=["classification", "regression", "generation"],
        help="generic tasks: problem type (default: inferred from the labels)",
    )
    g.add_argument("--loose-labels", action="store_true", help=LOOSE_HELP)


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model on a task with one method, evaluate it and write a run folder",
        description="Allocate (senslora), fine-tune, evaluate on the held-out test split and write result.json, "
        "adapter/, splits.json and checkpoints into --out.",
    )
    g = p.add_argument_group("method and task")
    g.add_argument(
        "--method",
        default="lora",
        help="lora, senslora, adalora, dylora, houlsby, pfeiffer, eva, cka, tsqlora, full",
    )
    g.add_argument(
        "--task",
        default="movie-polarity",
        help="movie-polarity, movie-score, tweet-polarity, chat-qa, or csv:PATH, jsonl:PATH, disk:PATH, glue:NAME",
    )
    add_generic_task_args(g)
    g.add_argument(
        "--split-seed", type=int, default=0, help="seed of the 80/10/10 split (independent of --seed)"
    )
    g.add_argument(
        "--max-train-samples", type=_positive_int, default=None, help="use only the first n train examples"
    )
    g.add_argument(
        "--max-eval-samples",
        type=_positive_int,
        default=None,
        help="use only the first n validation and test examples",
    )
    add_model_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=_finite_float, default=5e-4, help="peak AdamW learning rate (paper: 5e-4)")
    g.add_argument(
        "--batch-size", type=_positive_int, default=16, help="examples per step (also for evaluation)"
    )
    g.add_argument(
        "--eval-batch-size",
        type=_positive_int,
        default=None,
        help="examples per evaluation batch (default: --batch-size)",
    )
    g.add_argument("--epochs", type=_positive_int, default=3, help="passes over the train split")
    g.add_argument("--max-length", type=int, default=128, help="truncate examples to this many tokens (>= 8)")
    g.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, help="generation: tokens generated per answer"
    )
    g.add_argument(
        "--warmup-ratio", type=_finite_float, default=0.06, help="fraction of steps with linear warm-up"
    )
    g.add_argument("--weight-decay", type=_finite_float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=_finite_float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument(
        "--lora-dropout", type=_finite_float, default=0.0, help="dropout on the LoRA / adapter input"
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of initialisation, data order, dropout and calibration sample",
    )
    g.add_argument(
        "--calib-samples", type=_positive_int, default=128, help="calibration examples from the train split"
    )
    g.add_argument(
        "--save-every", type=int, default=0, help="checkpoint every n steps (0: at each epoch end only)"
    )
    g.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoints/ after a successful run")
    g.add_argument(
        "--no-eval-each-epoch", action="store_true", help="skip the validation pass after each epoch"
    )
    g.add_argument(
        "--eval-split",
        default="test",
        choices=["test", "validation"],
        help="split of the final evaluation in result.json (validation: for sweeps that must not read test)",
    )
    add_allocator_args(p, budget_default="params")
    g = p.add_argument_group("layer and data selection")
    g.add_argument(
        "--layers", default="all", choices=["all", "cka"], help="adapt all blocks, or the blocks CKA selects"
    )
    g.add_argument("--layer-ratio", type=_finite_float, default=0.5, help="cka: fraction of blocks kept")
    g.add_argument(
        "--data-select",
        default="none",
        choices=["none", "quality"],
        help="train on all data, or the best fraction by quality",
    )
    g.add_argument(
        "--data-keep", type=_finite_float, default=0.5, help="quality: fraction of train examples kept"
    )
    g.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="extra method option (JSON value), repeatable"
    )
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..core.distributed import current
    from ..training.train import train
    from .recipes import check_out_parent, config_from_args

    check_out_parent(args.out)
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
    p = sub.add_parser(
        "layers",
        help="layer-wise CKA: which blocks change their input most (seed 003)",
        description="Linear CKA between the input and output hidden states of every block over the "
        "calibration set; keeps the floor(ratio x L) blocks with the lowest CKA. Writes cka.json and cka.png.",
    )
    add_model_args(p)
    add_calib_args(p)
    p.add_argument(
        "--layer-ratio", type=_finite_float, default=0.5, help="fraction of blocks to keep, in (0, 1]"
    )
    p.add_argument(
        "--token",
        default="auto",
        choices=["auto", "first", "last"],
        help="token per example (auto: first for encoders, last non-pad for decoders)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    add_output_args(p)
    p.set_defaults(func=cmd_layers, estimator="activation")


def cmd_layers(args: argparse.Namespace) -> int:
    from .recipes import run_layers

    return _wrote(run_layers(args))


def _wrote(out) -> int:
    """The last line of a subcommand that wrote one output folder."""
    print(f"wrote {out}")
    return 0


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--out, --overwrite and --no-progress of the subcommands that write one output folder."""
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


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
    p.add_argument(
        "--fraction", type=_finite_float, default=0.01, help="top fraction of tokens / channels (default 0.01)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    add_output_args(p)
    p.set_defaults(func=cmd_diagnose)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .recipes import run_diagnose

    return _wrote(run_diagnose(args))


def add_select_data_parser(sub) -> None:
    p = sub.add_parser(
        "select-data",
        help="TsqLoRA-style data-quality selection of a task's training split (our reading of seed 002)",
        description="Score every training example with the frozen base model (per-example loss; for "
        "prompt/answer data the instruction-following difficulty), drop empty and duplicate items, keep "
        "the best fraction. Writes scores.jsonl, selection.json and scores.png.",
    )
    add_model_args(p)
    g = p.add_argument_group("task")
    g.add_argument(
        "--task", default="movie-polarity", help="task name or csv:PATH / jsonl:PATH / disk:PATH / glue:NAME"
    )
    add_generic_task_args(g)
    g.add_argument("--split-seed", type=int, default=0, help="seed of the 80/10/10 split")
    g.add_argument(
        "--max-train-samples",
        type=_positive_int,
        default=None,
        help="score only the first n training examples",
    )
    g.add_argument("--max-length", type=int, default=128, help="truncate examples to this many tokens")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="examples per scoring batch")
    p.add_argument(
        "--data-keep", type=_finite_float, default=0.5, help="fraction of examples to keep, in (0, 1]"
    )
    p.add_argument("--rule", default="auto", help="auto, trimmed-loss-high, loss-high, loss-low or ifd")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh head of a classifier")
    add_output_args(p)
    p.set_defaults(func=cmd_select_data)


def cmd_select_data(args: argparse.Namespace) -> int:
    from .recipes import run_select_data

    return _wrote(run_select_data(args))


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark config (methods x tasks x seeds); finished runs are skipped",
        description="Run every pending run of a benchmark YAML, each in its own process, writing "
        "OUT/runs/<experiment>/<run>/result.json. Rerunning resumes; failed runs are retried.",
    )
    p.add_argument("config", help="benchmark YAML, e.g. benchmarks/quick.yaml")
    p.add_argument("--out", required=True, help="results folder, e.g. results/quick")
    p.add_argument("--only", default=None, help="regex: run only matching experiment/run ids")
    p.add_argument(
        "--timeout",
        type=_finite_float,
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
    print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} already done")
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
    p.add_argument("--from", dest="source", default=None, metavar="TARBALL", help="a vaderSentiment-3.3.2.tar.gz on disk")
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

    p = sub.add_parser(
        "allocate",
        help="estimate sensitivities on a calibration set and write per-matrix ranks + a PEFT LoraConfig",
        description="Estimate Hessian diagonals on calibration data, allocate per-matrix LoRA ranks, "
        "write allocation.json, lora_config/ and ranks.png into --out.",
    )
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
    add_calib_args(p)
    add_allocator_args(p)
    p.add_argument(
        "--seed", type=int, default=0, help="seed for the calibration sample, fresh heads and probes"
    )
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-plot", action="store_true", help="skip ranks.png")
    p.add_argument(
        "--measure-forward",
        action="store_true",
        help="first time one plain forward pass over the calibration set, and report allocation / forward",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_allocate)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_layers_parser(sub)
    add_select_data_parser(sub)
    add_diagnose_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    add_fetch_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import os

    # transformers' load reports and per-tensor loading bars drown the CLI's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_warnings()
    raise_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print("senslora: terminated (SIGTERM); checkpoints are kept, rerun with --resume", file=sys.stderr)
        return 143
    except SensloraError as exc:
        print(f"senslora: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(
            f"senslora: error: cannot write {exc.filename}: permission denied; choose another --out",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("senslora: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        problem = _write_failure(exc)
        if problem is None:
            raise
        # The output folder, not the temporary file that failed (it has been removed).
        where = getattr(args, "out", None) or getattr(args, "results", None)
        where = f" writing {where}" if where else ""
        print(
            f"senslora: error: {problem}{where}; free space or choose another output folder", file=sys.stderr
        )
        return 2


def _show_warnings() -> None:
    """senslora's own warnings (dropped rows, truncated texts, a stale lock taken over) as
    ``senslora: warning: ...`` lines on stderr."""
    import logging

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
