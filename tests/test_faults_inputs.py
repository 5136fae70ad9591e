"""Faults, part 2 (issue 11): outputs never overlap inputs, one writer per output folder, corrupt
files and bad labels as one-line errors, benchmark configs checked before any run, SIGTERM.

Same rules as tests/test_faults.py: exit status 2, one ``senslora: error:`` line, no traceback, and
the folders involved exactly as they were (inputs untouched, no output, no lock or temporary left).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_faults
from test_faults import (
    GOOD_YAML,
    Ctx,
    _senslora,
    _wait_for,
    assert_model_refused,
    assert_one_error_line,
    base_args,
    run_cli,
    tree,
)

from senslora.core.errors import SensloraError
from senslora.data.guard import lock_path, output_lock
from senslora.data.tasks import load_task
from senslora.training.train import checkpoints

assets = test_faults.assets  # the same tiny model and task CSV (a module-scoped fixture)


def _csv(path: Path, rows: list[list[str]], header=("text", "label")) -> Path:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _rows(n: int = 40) -> list[list[str]]:
    return [[f"the film is {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg"] for i in range(n)]


def _finished_run_stub(c: Ctx) -> Path:
    """What `evaluate --merge` reads before loading anything: a run's result.json."""
    run = c.tmp / "run"
    run.mkdir()
    config = {"method": "lora", "model": str(c.model), "task": c.task}
    (run / "result.json").write_text(json.dumps({"status": "ok", "config": config, "metrics": {}}))
    return run


# ------------------------------------------------------------------------ 1. input protection
def _inputs_folder(c: Ctx) -> Path:
    """A folder holding the calibration file and the task CSV of the case."""
    folder = c.tmp / "inputs"
    folder.mkdir()
    (folder / "calib.txt").write_text("the film is good\nthe film is bad\n" * 8)
    _csv(folder / "task.csv", _rows(80))
    return folder


def _linked_model(c: Ctx) -> Path:
    copy = c.tmp / "model"
    shutil.copytree(c.model, copy)
    link = c.tmp / "link"
    link.symlink_to(copy)
    return link


OVERLAPS = {
    # command: argv after the base ones (c, inputs folder) -> (extra args, expected relation)
    "allocate --out is the calibration file's folder": (
        "allocate",
        lambda c, f: ["--calib", f / "calib.txt", "--out", f, "--overwrite"],
        "contains the calibration data",
    ),
    "allocate --out is a symlink to the model folder": (
        "allocate",
        lambda c, f: ["--model", c.tmp / "model", "--out", _linked_model(c), "--overwrite"],
        "is the model folder",
    ),
    "allocate --out inside the model folder": (
        "allocate",
        lambda c, f: ["--model", _linked_model(c), "--out", c.tmp / "model" / "alloc"],
        "lies inside the model folder",
    ),
    "train --out holds the task CSV": (
        "train",
        lambda c, f: ["--task", f"csv:{f / 'task.csv'}", "--out", f, "--overwrite"],
        "contains the task data",
    ),
    "layers --out is the calibration file": (
        "layers",
        lambda c, f: ["--calib", f / "calib.txt", "--out", f / "calib.txt", "--overwrite"],
        "is the calibration data",
    ),
    "select-data --out holds the task CSV": (
        "select-data",
        lambda c, f: ["--task", f"csv:{f / 'task.csv'}", "--out", f, "--overwrite"],
        "contains the task data",
    ),
    "evaluate --merge is the run": (
        "evaluate",
        lambda c, f: [_finished_run_stub(c), "--merge", c.tmp / "run", "--overwrite"],
        "--merge .* is the run folder",
    ),
    "evaluate --merge inside the run": (
        "evaluate",
        lambda c, f: [_finished_run_stub(c), "--merge", c.tmp / "run" / "adapter"],
        "lies inside the run folder",
    ),
    "bench --out holds the config": (
        "bench",
        lambda c, f: [c.yaml(GOOD_YAML), "--out", c.tmp, "--dry-run"],
        "contains the benchmark config",
    ),
    "bench --out holds a run's task data": (
        "bench",
        lambda c, f: [
            c.yaml(
                f"experiments: [{{name: e, grid: {{seed: [0]}}, params: {{task: 'csv:{f / 'task.csv'}'}}}}]\n"
            ),
            "--out",
            f,
        ],
        "contains the task data",
    ),
}


@pytest.mark.parametrize("name", list(OVERLAPS))
def test_an_output_that_overlaps_an_input_is_refused_before_anything_is_written(
    name, assets, tmp_path, capsys
):
    command, extra, relation = OVERLAPS[name]
    c = Ctx(assets, tmp_path)
    folder = _inputs_folder(c)
    argv = [command] if command in ("evaluate", "bench") else base_args(command, c)[:-2]
    argv += extra(c, folder)
    before = tree(tmp_path)
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, f"{relation} .*choose another")
    assert tree(tmp_path) == before


def test_every_writing_subcommand_has_an_overlap_case():
    assert {case[0] for case in OVERLAPS.values()} == {
        "allocate",
        "train",
        "layers",
        "select-data",
        "evaluate",
        "bench",
    }


# ------------------------------------------------------------------------------------ 2. lock
HOLD = """
import sys, time
from senslora.data.guard import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_of_the_same_folder_gets_one_line(assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(c.out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(tmp_path)
        for command in ("allocate", "train"):
            code, _, err = run_cli(base_args(command, c), capsys)
            assert_one_error_line(
                code, err, f"being written by another senslora process \\(pid {holder.pid} "
            )
        assert tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_stale_lock_of_a_dead_process_is_reported_and_taken_over(assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    lock_path(c.out).write_text("4194999 some-host\n")  # no process holds it (its flock is gone)
    code, out, err = run_cli(base_args("allocate", c), capsys)
    assert code == 0, err
    assert "locked by pid 4194999 on some-host, which is no longer running" in err
    assert not lock_path(c.out).exists() and (c.out / "allocation.json").is_file()


def test_the_lock_is_exclusive_in_one_process_too(tmp_path):
    with output_lock(tmp_path / "a" / "b" / "out") as path:
        assert path.read_text().split()[0] == str(os.getpid())
        with (
            pytest.raises(SensloraError, match="being written by another"),
            output_lock(tmp_path / "a" / "b" / "out"),
        ):
            pass
    assert not (tmp_path / "a").exists()  # parents made for the lock are removed again


# ------------------------------------------------------------------------- 3. corrupt files
def _damaged_model(c: Ctx, how: str) -> Path:
    folder = c.tmp / "damaged"
    shutil.copytree(c.model, folder)
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "garbage":
        weights.write_bytes(b"\x00garbage" * 64)
    else:
        for name in os.listdir(folder):
            if name.startswith("tokenizer") or name in ("vocab.txt", "special_tokens_map.json"):
                os.remove(folder / name)
    return folder


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "cannot load a classification model from .*damaged.* save the model again"),
        ("garbage", "cannot load a classification model from .*damaged"),
        ("no-tokenizer", "has no tokenizer files .*tokenizer.save_pretrained"),
    ],
)
def test_a_damaged_model_folder_is_one_line(how, message, assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    assert_model_refused(c, _damaged_model(c, how), message, capsys)


def test_device_map_naming_no_module(assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    device_map = c.file("map.json", json.dumps({"encoder.nope": "cpu"}))
    code, _, err = run_cli([*base_args("allocate", c), "--device-map", device_map], capsys)
    assert_one_error_line(code, err, "--device-map names no module of this model: encoder.nope; use")


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory) -> tuple[Path, str]:
    """A finished tiny lora run (1 epoch) and the summary line `train` printed."""
    c = Ctx(assets, tmp_path_factory.mktemp("finished"))
    out = subprocess.run(
        _senslora(*base_args("train", c), "--device", "cpu"), capture_output=True, text=True, check=True
    ).stdout
    return c.out, out


def test_the_label_type_is_reported_in_the_summary_and_result(finished_run):
    run, stdout = finished_run
    described = "classification (inferred from the labels), 2 classes: neg, pos"
    assert f"({described}): test accuracy=" in stdout
    assert json.loads((run / "result.json").read_text())["labels"] == described


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "has no adapter/ folder; rerun `senslora train`"),
        ("truncated", "cannot load the adapter .*adapter .*rerun `senslora train`"),
    ],
)
def test_evaluate_with_a_missing_or_corrupt_adapter(damage, message, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    if damage == "missing":
        shutil.rmtree(run / "adapter")
    else:
        weights = run / "adapter" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    before = tree(tmp_path)
    code, _, err = run_cli(["evaluate", run, "--merge", tmp_path / "merged", "--no-progress"], capsys)
    assert_one_error_line(code, err, message)
    assert tree(tmp_path) == before


def test_resume_from_a_corrupt_checkpoint(assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    argv = [*base_args("train", c), "--save-every", "1", "--epochs", "2"]
    proc = subprocess.Popen(_senslora(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: checkpoints(c.out), proc, "a checkpoint")
    finally:
        proc.kill()
        proc.wait()
    lock_path(c.out).unlink(missing_ok=True)  # left by the killed run
    last = checkpoints(c.out)[-1]
    (last / "trainable.safetensors").write_bytes(b"\x10\x00\x00")
    before = tree(tmp_path)
    code, _, err = run_cli([*argv, "--resume"], capsys)
    assert_one_error_line(code, err, f"cannot load the checkpoint {last} .*delete {last}")
    assert tree(tmp_path) == before


def test_resume_of_a_folder_that_does_not_exist(assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    code, _, err = run_cli([*base_args("train", c), "--resume"], capsys)
    assert_one_error_line(code, err, "--resume: .* does not exist; drop --resume")
    assert tree(tmp_path) == {}


# ------------------------------------------------------------------------------ 4. data checks
def _class_only_in_test(path: Path) -> Path:
    """80 rows and one of class 'rare', placed where the seed-0 split puts it into the test split."""
    rows = _rows(80)
    rows.insert(int(np.random.default_rng(0).permutation(81)[0]), ["the film is one", "rare"])
    return _csv(path, rows)


LABEL_CASES = {
    "NaN label": (
        lambda p: _csv(p, _rows()[:5] + [["x", "NaN"]] + _rows()[5:]),
        "row 6 has no label in column 'label' \\(empty, NaN, None or null\\)",
    ),
    "None and null labels": (
        lambda p: _csv(p, _rows()[:3] + [["x", "None"], ["y", "null"]] + _rows()[3:]),
        "rows 4, 5 have no label",
    ),
    "one text value in a score column": (
        lambda p: _csv(p, [[f"t {i}", f"{i / 7:.3f}"] for i in range(40)] + [["x", "high"]]),
        r"mixes numbers and text .*row 41.*--loose-labels",
    ),
    "one fractional value in a binary column": (
        lambda p: _csv(p, [[f"t {i}", str(i % 2)] for i in range(40)] + [["x", "0.5"]]),
        "integers except in row 41.*--problem regression",
    ),
    "labels differing in case": (
        lambda p: _csv(p, _rows()[:7] + [["x", "Pos"]] + _rows()[7:]),
        "differ only in case or spaces .*'Pos' in row 8.*--loose-labels",
    ),
    "labels differing in spaces": (
        lambda p: _csv(p, _rows()[:7] + [["x", "pos "]] + _rows()[7:]),
        "differ only in case or spaces .*'pos ' in row 8",
    ),
    "list labels in JSONL": (
        lambda p: (
            p.with_suffix(".jsonl").write_text(
                "".join(
                    json.dumps({"text": t, "label": [lab] if i == 2 else lab}) + "\n"
                    for i, (t, lab) in enumerate(_rows())
                )
            )
            and p.with_suffix(".jsonl")
        ),
        "holds a list or an object in row 3",
    ),
    "every text empty": (lambda p: _csv(p, [["", lab] for _, lab in _rows()]), "every text of .* is empty"),
    "a class missing from the train split": (
        _class_only_in_test,
        "class\\(es\\) 'rare' of .* have no example in the train split",
    ),
}


@pytest.mark.parametrize("name", list(LABEL_CASES))
def test_bad_labels_and_texts_are_one_line(name, assets, tmp_path, capsys):
    make, message = LABEL_CASES[name]
    c = Ctx(assets, tmp_path)
    data = make(tmp_path / "data.csv")
    kind = "jsonl" if data.suffix == ".jsonl" else "csv"
    before = tree(tmp_path)
    for command in ("train", "select-data"):
        code, _, err = run_cli([*base_args(command, c), "--task", f"{kind}:{data}"], capsys)
        assert_one_error_line(code, err, message)
    assert tree(tmp_path) == before


def test_loose_labels_merges_variants_and_reads_mixed_columns_as_classes(tmp_path):
    variants = _csv(tmp_path / "v.csv", _rows()[:7] + [["x", "Pos"], ["y", " pos"]] + _rows()[7:])
    task = load_task(f"csv:{variants}", loose_labels=True)
    assert task.describe() == "classification (inferred from the labels), 2 classes: neg, pos"
    mixed = _csv(tmp_path / "m.csv", [[f"t {i}", str(i % 3)] for i in range(40)] + [["x", "other"]])
    assert load_task(f"csv:{mixed}", loose_labels=True).label_names == ["0", "1", "2", "other"]


def test_empty_texts_are_dropped_with_a_count(tmp_path, capsys):
    from senslora.cli.main import _show_warnings

    _show_warnings()
    data = _csv(tmp_path / "d.csv", _rows(40) + [["", "pos"], ["  ", "neg"]])
    task = load_task(f"csv:{data}")
    assert sum(map(len, (task.train, task.validation, task.test))) == 40
    assert "dropped 2 of 42 examples with an empty text" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "calib.csv",
            "text,label\nthe film,NaN\n",
            "row 1: label column 'label' is empty or missing \\('NaN'\\)",
        ),
        ("calib.jsonl", '{"text": ""}\n{"text": "  "}\n', "every text of calibration set .* is empty"),
    ],
)
def test_bad_calibration_labels_and_texts(name, text, message, assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    argv = [*base_args("allocate", c), "--calib", c.file(name, text)]
    if "label" in text:
        argv += ["--label-column", "label", "--estimator", "fisher"]
    before = tree(tmp_path)
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, message)
    assert tree(tmp_path) == before


def test_texts_longer_than_the_model_are_truncated_with_a_warning(assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    calib = c.file("long.txt", ("the film is good " * 40 + "\n") * 10)
    code, _, err = run_cli([*base_args("allocate", c), "--calib", calib, "--max-length", "128"], capsys)
    assert code == 0, err
    assert "--max-length 128 exceeds the model's 64 positions; texts are truncated to 64 tokens" in err


# -------------------------------------------------------------------------- 5. bench configs
TRAIN = "experiments:\n  - {name: e, kind: train, grid: {seed: [0]}, params: {PARAMS}}\n"
BENCH_CASES = {
    "unknown top-level key": ("grdi: {}\n" + GOOD_YAML, [], "unknown key\\(s\\) 'grdi'"),
    "unknown experiment key": (
        "experiments:\n  - {name: e, grdi: {seed: [0]}}\n",
        [],
        "experiment 'e' .* unknown key\\(s\\) 'grdi'",
    ),
    "unknown defaults kind": ("defaults: {trian: {}}\n" + GOOD_YAML, [], "unknown key\\(s\\) 'trian'"),
    "wrong type": (TRAIN.replace("PARAMS", "epochs: two"), [], "run e/seed=0: --epochs must be an integer"),
    "out of range": (TRAIN.replace("PARAMS", "lr: -1"), [], "run e/seed=0: --lr must be a number > 0"),
    "unknown run parameter": (TRAIN.replace("PARAMS", "epochz: 1"), [], "unknown run parameter 'epochz'"),
    "unknown method": (TRAIN.replace("PARAMS", "method: lorra"), [], "unknown method 'lorra'"),
    "option value not a boolean": (
        TRAIN.replace("PARAMS", "options.plot: flase"),
        [],
        'option plot must be true or false, got "flase"',
    ),
    "option the method does not read": (
        TRAIN.replace("PARAMS", "options.eva_rho: 2"),
        [],
        "method lora reads no option 'eva_rho'",
    ),
    "best-of an unknown experiment": (
        TRAIN.replace("PARAMS", "lr: 'best-of:sweep'"),
        [],
        "best-of:sweep names no experiment before 'e'",
    ),
    "unknown probe parameter": (
        "experiments:\n  - {name: p, kind: allocation-probe, grid: {seed: [0]}, params: {repeat: 2}}\n",
        [],
        "unknown allocation-probe parameter\\(s\\) repeat",
    ),
    "--only not a regex": (
        GOOD_YAML,
        ["--only", "seed=(0"],
        "--only 'seed=\\(0' is not a valid regular expression",
    ),
    "--timeout negative": (GOOD_YAML, ["--timeout", "-1"], "--timeout must be a number of seconds >= 0"),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
@pytest.mark.parametrize("name", list(BENCH_CASES))
def test_bench_configs_are_checked_in_full_before_any_run(name, dry_run, assets, tmp_path, capsys):
    text, extra, message = BENCH_CASES[name]
    c = Ctx(assets, tmp_path)
    config = c.yaml(text)
    before = tree(tmp_path)
    code, _, err = run_cli(
        ["bench", config, "--out", c.out, *extra, *(["--dry-run"] if dry_run else [])], capsys
    )
    assert_one_error_line(code, err, message)
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("option", "message"),
    [("plot=flase", 'option plot must be true or false, got "flase"'), ("grid=1", "reads no option 'grid'")],
)
def test_train_option_keys_and_values_are_strict(option, message, assets, tmp_path, capsys):
    c = Ctx(assets, tmp_path)
    code, _, err = run_cli([*base_args("train", c), "--option", option], capsys)
    assert_one_error_line(code, err, message)
    assert tree(tmp_path) == {}


# ------------------------------------------------------------------------------- 6. SIGTERM
def _terminated_after_checkpoint_2(argv: list, run: Path, root: Path) -> str:
    """Run the CLI, SIGTERM it once ``run`` has checkpoint step-2; its stderr, after checking exit
    143, no traceback, the checkpoints kept, no result, and no temporary folder or lock under ``root``."""
    proc = subprocess.Popen(_senslora(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: [p for p in checkpoints(run) if int(p.name[5:]) >= 2], proc, "checkpoint step-2")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert checkpoints(run) and not (run / "result.json").exists()
    leftovers = [p.name for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock")]
    assert leftovers == []
    return err


def test_sigterm_is_one_line_exit_143_checkpoints_kept_nothing_temporary(assets, tmp_path):
    c = Ctx(assets, tmp_path)
    argv = [*base_args("train", c), "--save-every", "1", "--epochs", "3", "--batch-size", "4"]
    err = _terminated_after_checkpoint_2(argv, c.out, tmp_path)
    lines = [line for line in err.splitlines() if line.startswith("senslora")]
    assert lines == ["senslora: terminated (SIGTERM); checkpoints are kept, rerun with --resume"], err


def test_sigterm_to_bench_stops_its_worker_the_same_way(assets, tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text(
        f"""
defaults:
  train: {{model: "{assets / "model"}", task: "csv:{assets / "task.csv"}", epochs: 3, batch_size: 4,
          max_length: 16, calib_samples: 8, save_every: 1, options.plot: false, device: cpu}}
experiments:
  - {{name: e, kind: train, grid: {{seed: [0]}}}}
"""
    )
    run = tmp_path / "results" / "runs" / "e" / "seed=0"
    _terminated_after_checkpoint_2(["bench", config, "--out", tmp_path / "results"], run, tmp_path)
