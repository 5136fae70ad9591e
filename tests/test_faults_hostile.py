"""Faults, part 3 (issue 29): a second round of hostile inputs, one test (or table) per class.

1. Paths derived from names (experiment, run, plot and model names) are one safe component.
2. Every output flag (``--out``, ``--merge``): not empty, not ``.``, not a file, a broken symlink
   or a symlink loop, with ``--overwrite`` or not.
3. Every number of every config field and of every flag is checked against its declared range.
4. Exceptions of PEFT, transformers, tokenizers, safetensors and the OS inside a subcommand are
   one line naming the step (the traceback behind ``--debug`` / ``SENSLORA_DEBUG=1``).
5. A model whose weights do not match its config (missing or reshaped) is refused.
6. Task sanity: the text column is not the label column nor a copy of it, texts are strings.
7. Weak messages: a folder as a data file, thousands of classes, the size of a benchmark grid.

Same rules as tests/test_faults.py: exit status 2, one ``senslora: error:`` line, no traceback, and
the folders involved exactly as they were.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import test_faults
from test_faults import GOOD_YAML, Ctx, assert_model_refused, base_args, fake_results, run_cli, tree
from test_faults import assert_one_error_line as one_line
from test_faults_inputs import _csv, _finished_run_stub, _rows

from senslora.cli.main import build_parser
from senslora.core.config import AllocationConfig
from senslora.core.errors import SensloraError
from senslora.data.guard import path_component
from senslora.training.config import TrainConfig

assets = test_faults.assets  # the same tiny model and task CSV (a module-scoped fixture)


def outside(root: Path) -> dict:
    """Everything in the parent of ``root`` but ``root`` itself: what a path escape would touch."""
    return {p.name for p in root.parent.iterdir() if p != root}


# ----------------------------------------------------------------------- 1. derived paths
@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "..", "a\\b", 5])
def test_a_benchmark_experiment_name_must_be_one_safe_folder_name(name, assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    config = c.yaml(
        "experiments:\n  - " + json.dumps({"name": name, "kind": "train", "grid": {"seed": [0]}}) + "\n"
    )
    before, around = tree(tmp_path), outside(tmp_path)
    for dry in ([], ["--dry-run"]):
        code, _, err = run_cli(["bench", config, "--out", c.out, *dry], capsys)
        one_line(code, err, "experiment name in .* cannot name a folder or file")
    assert tree(tmp_path) == before and outside(tmp_path) == around


@pytest.mark.parametrize(
    "name", ["../x", "..", ".", "", ".hidden", "a/b/c", "a\\b", "nul\x00l", "x" * 300, "ü" * 150, 7]
)
def test_path_component_escapes_every_name_into_one_safe_component(name):
    safe = path_component(name, "name", escape=True)
    assert safe not in ("", ".", "..") and not safe.startswith(".")
    assert "/" not in safe and "\\" not in safe and "\x00" not in safe
    assert len(safe.encode()) <= 200
    with pytest.raises(SensloraError, match="cannot name a folder or file"):
        path_component(name, "name")
    assert path_component("lr-sweep_2.e=1,b+c", "name") == "lr-sweep_2.e=1,b+c"  # safe names unchanged


def test_run_ids_and_report_plots_are_escaped(tmp_path, capsys):
    from senslora.bench.harness import Run

    assert not Run("e", "train", {}, {".x": 1}).run_id.startswith(".")
    results = fake_results(tmp_path / "results")  # one run, experiment "e"
    meta = results / "runs" / "e" / "seed=0" / "bench.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "experiment": "../../evil"}))
    around = outside(results)
    code, _, err = run_cli(["report", results], capsys)
    assert code == 0, err
    assert outside(results) == around  # no plot written outside results/
    assert [p.name for p in (results / "plots").iterdir()] == ["_._.._evil.png"]


# ----------------------------------------------------------------------------- 2. --out
def _loop(c: Ctx) -> Path:
    (c.tmp / "loop-b").symlink_to(c.tmp / "loop-a")
    (c.tmp / "loop-a").symlink_to(c.tmp / "loop-b")
    return c.tmp / "loop-a"


def _dangling(c: Ctx) -> Path:
    (c.tmp / "dangling").symlink_to(c.tmp / "nowhere")
    return c.tmp / "dangling"


OUTS = {
    "empty": (lambda c: "", "is empty; name the output folder"),
    "the current folder": (lambda c: ".", "names an existing folder above or itself"),
    "an existing file": (lambda c: c.file("results.txt", "precious\n"), "exists and is not a folder \\(a file\\)"),
    "a symlink loop": (_loop, "is not a folder \\(a symlink loop\\)"),
    "inside a symlink loop": (lambda c: _loop(c) / "out", "lies under a symlink loop"),
    "a broken symlink": (_dangling, "is not a folder \\(a broken symlink\\)"),
}
OUT_COMMANDS = ["allocate", "train", "layers", "select-data", "bench", "evaluate --merge"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["", "overwrite"])
@pytest.mark.parametrize("command", OUT_COMMANDS)
@pytest.mark.parametrize("what", list(OUTS))
def test_every_out_names_a_folder_or_nothing_yet(what, command, overwrite, assets, tmp_path, monkeypatch, capsys):
    make, message = OUTS[what]
    c = Ctx(assets, tmp_path)
    monkeypatch.chdir(tmp_path)
    out = make(c)
    flag = "--merge" if command == "evaluate --merge" else "--out"
    if command == "evaluate --merge":
        argv = ["evaluate", _finished_run_stub(c), "--merge", out]
    elif command == "bench":
        argv = ["bench", c.yaml(GOOD_YAML), "--out", out, "--dry-run"]
    else:
        argv = [*base_args(command, c)[:-1], out]
    before = tree(tmp_path)
    code, _, err = run_cli([*argv, *(["--overwrite"] if overwrite and command != "bench" else [])], capsys)
    one_line(code, err, f"{flag} .*{message}")
    assert tree(tmp_path) == before  # the file kept as it was, no folder, no .tmp-* or .old-* left
    if what == "an existing file":
        assert (tmp_path / "results.txt").read_text() == "precious\n"


# ----------------------------------------------------------------- 3. declared ranges
def _bad_values(rng) -> list:
    bad = [math.nan, math.inf, "x", True]
    if math.isfinite(rng.low):
        bad.append(rng.low if rng.low_open else rng.low - 1)
    if math.isfinite(rng.high):
        bad.append(rng.high if rng.high_open else rng.high + 1)
    if rng.integer:
        bad.append(max(rng.low, 0) + 1.5)
    return bad


def _field_cases(cls, build) -> list:
    """(field, bad value) for every field of ``cls`` that takes a number, a choice, true/false or a text."""
    from senslora.core.presets import RECIPE_KEYS

    cases = []
    for f in dataclasses.fields(cls):
        kind = str(f.type).replace(" | None", "")
        rng = f.metadata.get("range")
        if kind in ("int", "float"):
            assert rng is not None or f.name in RECIPE_KEYS, f"{cls.__name__}.{f.name} declares no range"
            cases += [(f.name, v) for v in (_bad_values(rng) if rng else [math.nan, -5, "x"])]
        elif f.metadata.get("choices") or f.metadata.get("names") or f.name in RECIPE_KEYS:
            cases.append((f.name, "bogus"))
        elif kind == "bool":
            cases.append((f.name, "flase"))
        elif kind == "str":
            cases.append((f.name, 5))
    return [pytest.param(build, name, value, id=f"{cls.__name__}.{name}={value!r}") for name, value in cases]


def _train_config(**kw):
    TrainConfig(**kw).validate()


@pytest.mark.parametrize(
    ("build", "name", "value"), _field_cases(TrainConfig, _train_config) + _field_cases(AllocationConfig, AllocationConfig)
)
def test_every_config_field_refuses_what_it_does_not_declare(build, name, value):
    with pytest.raises(SensloraError) as err:
        build(**{name: value})
    assert "\n" not in str(err.value)
    assert any(n in str(err.value) for n in (name.replace("_", "-"), name.replace("_", " "))), str(err.value)


def _out_of_range(rng) -> str:
    """A value just outside ``rng`` (-5 for a recipe value, whose check is the recipe table's)."""
    if rng is None:
        return "-5"
    value = rng.low if rng.low_open else rng.low - 1
    return str(int(value) if rng.integer else float(value))


def _number_flags() -> list:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [
        (command, action)
        for command, p in sub.choices.items()
        for action in p._actions
        if action.type is not None and getattr(action.type, "__name__", "") in ("int", "float", "finite_float", "positive_int")
    ]


def test_every_number_flag_declares_its_check():
    flags = _number_flags()
    assert len(flags) > 40
    unchecked = [f"{command} {action.option_strings[0]}" for command, action in flags if not getattr(action, "check", None)]
    assert unchecked == []


MINIMAL = {"evaluate": ["RUN"], "report": ["RESULTS"], "show-data": []}  # the commands without --out


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        pytest.param(command, action.option_strings[0], _out_of_range(action.range),
                     id=f"{command} {action.option_strings[0]}")
        for command, action in _number_flags()
    ],
)  # fmt: skip
def test_every_number_flag_out_of_range_is_one_line_before_any_work(command, flag, value, tmp_path, capsys):
    argv = [command, *(["bench.yaml"] if command == "bench" else [])]
    argv += [*MINIMAL.get(command, ["--out", tmp_path / "out"]), flag, value]
    code, _, err = run_cli(argv, capsys)
    one_line(code, err, f"{flag}( must be|: expected a positive integer)")  # the latter: the parser's
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("command", ["allocate", "train", "layers", "select-data", "diagnose"])
def test_a_negative_seed_is_one_line(command, assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    argv = base_args(command, c) if command != "diagnose" else ["diagnose", "--model", c.model, "--out", c.out]
    code, _, err = run_cli([*argv, "--seed", "-1"], capsys)
    one_line(code, err, r"--seed must be an integer in \[0, 4294967295\], got -1")
    assert tree(tmp_path) == {}


def test_a_negative_split_seed_in_a_benchmark_is_one_line(assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    config = c.yaml("experiments:\n  - {name: e, grid: {split_seed: [-1]}}\n")
    before = tree(tmp_path)
    code, _, err = run_cli(["bench", config, "--out", c.out, "--dry-run"], capsys)
    one_line(code, err, "run e/split_seed=-1: --split-seed must be an integer in")
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- 4. foreign exceptions
def _transformers_fails(*args, **kwargs):
    from transformers import AutoConfig

    AutoConfig.for_model("no-such-model-type")


def _tokenizers_fails(*args, **kwargs):
    from tokenizers.implementations import ByteLevelBPETokenizer

    ByteLevelBPETokenizer.from_file("/nonexistent/vocab.json", "/nonexistent/merges.txt")


def _safetensors_fails(*args, **kwargs):
    import tempfile

    from safetensors.torch import load_file

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as fh:
        fh.write(b"\x08garbage")
        fh.flush()
        load_file(fh.name)


def _os_fails(*args, **kwargs):
    raise OSError(errno.EIO, os.strerror(errno.EIO), "/dev/sdz")


FAMILIES = {
    "transformers": (_transformers_fails, "transformers raised ValueError"),
    "tokenizers": (_tokenizers_fails, "tokenizers raised Exception: Error while reading vocab"),
    "safetensors": (_safetensors_fails, "safetensors raised SafetensorError"),
    "the OS": (_os_fails, "the OS raised OSError: \\[Errno 5\\]"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_library_failing_inside_a_step_is_one_line_naming_the_step(family, assets, tmp_path, monkeypatch, capsys):
    fails, message = FAMILIES[family]
    monkeypatch.setattr("senslora.core.pipeline.find_targets", fails)
    c = Ctx(assets, tmp_path)
    code, _, err = run_cli(base_args("allocate", c), capsys)
    one_line(code, err, f"estimating the sensitivities and allocating the ranks failed: {message}.*--debug")
    assert tree(tmp_path) == {}


def test_peft_refusing_the_targets_is_one_line_and_debug_shows_the_traceback(assets, tmp_path, monkeypatch, capsys):
    """`--targets classifier`: the only target is the fresh head, which PEFT trains in full and will
    not wrap (NoMatchingPeftModuleError)."""
    c = Ctx(assets, tmp_path)
    argv = [*base_args("train", c), "--method", "senslora", "--targets", "classifier", "--avg-rank", "1"]
    code, _, err = run_cli(argv, capsys)
    one_line(code, err, "preparing the model for method senslora failed: peft raised NoMatchingPeftModuleError.*--targets")
    assert tree(tmp_path) == {}
    for debug in (["--debug"], []):
        monkeypatch.setenv("SENSLORA_DEBUG", "0" if debug else "1")
        code, _, err = run_cli([*argv, *debug], capsys)
        assert code == 2 and "Traceback" in err and "NoMatchingPeftModuleError" in err
        assert err.rstrip().splitlines()[-1].startswith("senslora: error: preparing the model")
        assert tree(tmp_path) == {}


def test_a_bug_of_senslora_keeps_its_traceback(assets, tmp_path, monkeypatch, capsys):
    def bug(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr("senslora.core.pipeline.find_targets", bug)
    with pytest.raises(ZeroDivisionError):
        run_cli(base_args("allocate", Ctx(assets, tmp_path)), capsys)


# -------------------------------------------------------------------- 5. model integrity
def _mixed_model(c: Ctx, how: str) -> Path:
    """The tiny BERT's weights under another config: a LLaMA one, or a BERT twice as wide."""
    from tiny import tiny_bert, tiny_llama

    folder = c.tmp / how
    shutil.copytree(c.model, folder)
    if how == "another-architecture":
        config = tiny_llama(vocab_size=30522).config
        config.architectures = ["LlamaForSequenceClassification"]
    else:
        config = tiny_bert(vocab_size=30522, hidden_size=32, intermediate_size=64).config
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("another-architecture", "does not hold the weights of its LlamaForSequenceClassification: 20 missing"),
        ("another-shape", "does not hold the weights of its BertForSequenceClassification: .* of another shape"),
    ],
)
def test_weights_that_do_not_match_the_config_are_refused(how, message, assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    assert_model_refused(c, _mixed_model(c, how), f"{message}.*random.*save the model again", capsys)


def test_a_fresh_head_and_tied_embeddings_are_not_reported(tmp_path, monkeypatch):
    """Only the head senslora adds may be new: a classifier / score head on a base checkpoint, and
    an lm_head tied to the embeddings (not saved), load without error; so do minilm and a GGUF."""
    from tiny import tiny_bert, tiny_llama, write_tiny_llama_gguf

    from senslora.data.models import load_model

    tiny_bert().bert.save_pretrained(tmp_path / "bert-base")  # a bare encoder: the head is new
    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "llama-tied")
    from conftest import make_word_tokenizer

    for folder in ("bert-base", "llama-tied"):
        make_word_tokenizer().save_pretrained(tmp_path / folder)
    load_model(tmp_path / "bert-base", kind="classification", device="cpu")
    for kind in ("causal-lm", "classification", "base"):
        load_model(tmp_path / "llama-tied", kind=kind, device="cpu")
    load_model("minilm", kind="classification", device="cpu")
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("SENSLORA_CACHE", str(tmp_path / "cache"))
    load_model(tmp_path / "tiny.gguf", kind="causal-lm", device="cpu")


# ---------------------------------------------------------------------- 6. task sanity
def _jsonl(path: Path, rows: list[dict]) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TASK_CASES = {
    "text column = label column": (
        lambda p: _csv(p, _rows()),
        ["--text-column", "label"],
        "--text-column and --label-column are both 'label', so the model would read the answer",
    ),
    "text pair column = label column": (
        lambda p: _csv(p, _rows()),
        ["--text-pair-column", "label"],
        "--text-pair-column and --label-column are both 'label'",
    ),
    "a text column copying the labels": (
        lambda p: _csv(p, [[t, lab, f" {lab.upper()}"] for t, lab in _rows()], header=("text", "label", "copy")),
        ["--text-column", "copy"],
        "the text equals its label in 40 of 40 rows .*copy of the labels.*--allow-label-text",
    ),
    "a JSON object as a text": (
        lambda p: _jsonl(p, [{"text": {"a": i} if i == 3 else t, "label": lab} for i, (t, lab) in enumerate(_rows())]),
        [],
        "text column 'text' holds a list, an object or true/false in row 4",
    ),
    "a list as a text pair": (
        lambda p: _jsonl(p, [{"text": t, "pair": [t] if i > 37 else t, "label": lab} for i, (t, lab) in enumerate(_rows())]),
        ["--text-pair-column", "pair"],
        "text column 'pair' holds a list, an object or true/false in rows 39, 40",
    ),
}


@pytest.mark.parametrize("name", list(TASK_CASES))
def test_a_task_that_would_train_on_its_answer_or_a_non_text_is_one_line(name, assets, tmp_path, capsys):
    make, extra, message = TASK_CASES[name]
    c = Ctx(assets, tmp_path)
    data = make(tmp_path / "data.csv")
    kind = "jsonl" if data.suffix == ".jsonl" else "csv"
    before = tree(tmp_path)
    for command in ("train", "select-data"):
        code, _, err = run_cli([*base_args(command, c), "--task", f"{kind}:{data}", *extra], capsys)
        one_line(code, err, message)
    assert tree(tmp_path) == before


def test_allow_label_text_turns_the_copy_into_a_warning(tmp_path, capsys):
    from senslora.cli.main import _show_warnings
    from senslora.data.tasks import load_task

    _show_warnings()
    data = _csv(tmp_path / "d.csv", [[lab, lab] for _, lab in _rows()])
    task = load_task(f"csv:{data}", allow_label_text=True)
    assert task.num_labels == 2
    assert "the text equals its label in 40 of 40 rows" in capsys.readouterr().err
    half = _csv(tmp_path / "h.csv", [[lab if i % 2 else t, lab] for i, (t, lab) in enumerate(_rows())])
    load_task(f"csv:{half}")  # half the rows is not "most": no error


def test_calibration_text_column_equal_to_the_label_column(assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    calib = _csv(tmp_path / "calib.csv", _rows())
    argv = [*base_args("allocate", c), "--calib", calib, "--text-column", "label", "--label-column", "label"]
    before = tree(tmp_path)
    code, _, err = run_cli(argv, capsys)
    one_line(code, err, "--text-column and --label-column are both 'label'")
    assert tree(tmp_path) == before


# -------------------------------------------------------------------- 7. weak messages
@pytest.mark.parametrize("prefix", ["csv", "jsonl"])
def test_a_folder_given_as_a_data_file_is_named_a_folder(prefix, assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    (tmp_path / "data").mkdir()
    before = tree(tmp_path)
    for command in ("train", "select-data"):
        code, _, err = run_cli([*base_args(command, c), "--task", f"{prefix}:{tmp_path / 'data'}"], capsys)
        one_line(code, err, "data file .*data is a folder, not a file; for a folder saved by datasets write disk:")
    code, _, err = run_cli(["bench", tmp_path / "data", "--out", c.out], capsys)
    one_line(code, err, "benchmark config .*data is a folder, not a file")
    assert tree(tmp_path) == before


def test_ten_thousand_classes_missing_from_train_are_named_briefly(assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    data = _csv(tmp_path / "many.csv", [[f"the film {i}", f"class-{i}"] for i in range(10_000)])
    code, _, err = run_cli([*base_args("train", c), "--task", f"csv:{data}"], capsys)
    one_line(code, err, r"2000 class\(es\) 'class-\d+', .* and 1995 more of .* have no example in the train split")
    assert max(map(len, err.splitlines())) < 600


def test_bench_says_how_many_runs_and_how_long_before_starting(assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    config = c.yaml("experiments:\n  - {name: e, kind: train, grid: {seed: [0, 1, 2], lr: [0.1, 0.2]}}\n")
    code, out, err = run_cli(["bench", config, "--out", c.out, "--dry-run"], capsys)
    assert code == 0, err
    assert "6 runs, 0 already done, 6 to run (no finished run to estimate the time from yet)" in out
    finished = c.out / "runs" / "e" / "seed=0,lr=0.1"
    finished.mkdir(parents=True)
    (finished / "result.json").write_text(json.dumps({"status": "ok", "wall_time_s": 600.0}))
    code, out, err = run_cli(["bench", config, "--out", c.out, "--dry-run"], capsys)
    assert code == 0, err
    assert (
        "6 runs, 1 already done, 5 to run; the 1 finished runs took 10 min each (median); by the "
        "finished runs of the same experiment, else model, about 50 min for the rest" in out
    )
    assert out.index("6 runs") < out.index("would run")  # said before the runs
    # A second experiment on another model: its runs are estimated from runs of that model, not
    # from the first experiment's (a decoder run takes several times an encoder run).
    config = c.yaml(
        "experiments:\n  - {name: e, kind: train, grid: {seed: [0, 1, 2], lr: [0.1, 0.2]}}\n"
        "  - {name: d, kind: train, grid: {seed: [0, 1]}, params: {model: big}}\n"
    )
    other = c.out / "runs" / "old" / "seed=0"
    other.mkdir(parents=True)
    (other / "result.json").write_text(json.dumps({"status": "ok", "wall_time_s": 3600.0, "model": "big"}))
    code, out, err = run_cli(["bench", config, "--out", c.out, "--dry-run"], capsys)
    assert code == 0, err
    assert "8 runs, 1 already done, 7 to run; the 2 finished runs took 35 min each (median)" in out
    assert "about 2.8 h for the rest" in out  # 5 x 10 min + 2 x 60 min
