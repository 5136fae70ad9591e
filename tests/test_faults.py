"""Faults and bad input (issue 6): the CLI under wrong arguments, corrupt files, unwritable folders
and full disks, and `train` / `bench` killed with SIGKILL and rerun.

Every bad input must end with exit status 2 (argparse's own errors raise ``SystemExit(2)``), exactly
one error line on stderr and no traceback, and must leave the folders it was pointed at exactly as
they were: no output folder, no half-written file, no ``.NAME.tmp-*`` temporary.

The cached dequantised SmolLM2 folder (verified by hash before use, rebuilt when damaged) is
covered by ``tests/test_models.py``: ``test_manifest_roundtrip_and_damage`` (check_manifest on a
damaged fake folder) and ``test_smollm2_cache_logic`` (a damaged cache is detected and rebuilt).
"""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny import save_tiny_bert_with_minilm_tokenizer

from senslora.cli.main import build_parser, main
from senslora.cli.recipes import config_from_args
from senslora.training.train import checkpoints, train

# "senslora: error: ..." (SensloraError) or "senslora train: error: ..." (argparse).
ERROR_LINE = re.compile(r"^senslora(?: [a-z-]+)?: error: ")
WORDS_POS = ["good", "great", "fine", "nice"]
WORDS_NEG = ["bad", "awful", "poor", "dull"]


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny random BERT (dropout on, so a resume must restore the RNG) saved with the real MiniLM
    tokenizer, an 80-row sentiment CSV, and a fake finished benchmark for `report`."""
    root = tmp_path_factory.mktemp("fault-assets")
    save_tiny_bert_with_minilm_tokenizer(
        root / "model", max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )
    rng = random.Random(0)
    with open(root / "task.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(80):
            positive = i % 2 == 0
            word = rng.choice(WORDS_POS if positive else WORDS_NEG)
            filler = " ".join(rng.choice(["very", "not", "quite", "the"]) for _ in range(rng.randint(0, 3)))
            writer.writerow([f"the film is {word} {filler}".strip(), "pos" if positive else "neg"])
    return root


def fake_results(folder: Path) -> Path:
    """A benchmark folder with one finished train run, as `senslora bench` writes it."""
    run = folder / "runs" / "e" / "seed=0"
    run.mkdir(parents=True)
    result = {
        "status": "ok",
        "method": "lora",
        "seed": 0,
        "primary_metric": "accuracy",
        "metrics": {"accuracy": 0.75},
        "trainable_params": 10,
        "budget_params": 10,
        "step_time_median_s": 0.1,
        "peak_memory_mb": 1.0,
    }
    (run / "result.json").write_text(json.dumps(result))
    meta = {"experiment": "e", "kind": "train", "grid": {"seed": 0}, "params": {}, "baseline": {}}
    (run / "bench.json").write_text(json.dumps(meta))
    return folder


def tree(root: Path) -> dict[str, object]:
    """Every file (with its size) and folder under ``root``, hidden ones included."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
    }


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``senslora.cli.main.main`` in-process: (exit status, stdout, stderr); argparse's exits included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert re.search(message, lines[0]), lines[0]


def assert_model_refused(c: Ctx, model: Path, message: str, capsys) -> None:
    """``allocate`` and ``train`` on ``model`` each end in one error line matching ``message`` and
    leave every file under ``c.tmp`` as it was."""
    for command in ("allocate", "train"):
        before = tree(c.tmp)
        code, _, err = run_cli([*base_args(command, c), "--model", model], capsys)
        assert_one_error_line(code, err, message)
        assert tree(c.tmp) == before


# ------------------------------------------------------------------------------ bad input table
@dataclass
class Case:
    """One bad input: the subcommand, the arguments after its base ones, and the expected error."""

    command: str
    extra: object  # callable(Ctx) -> list of arguments
    message: str  # regex searched in the error line


class Ctx:
    """Paths of one case: inputs are made inside ``tmp``; outputs go to ``out`` unless overridden."""

    def __init__(self, assets: Path, tmp: Path):
        self.assets, self.tmp = assets, tmp
        self.model = assets / "model"
        self.task = f"csv:{assets / 'task.csv'}"
        self.out = tmp / "out"

    def file(self, name: str = "a-file", text: str = "not a folder\n") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def yaml(self, text: str) -> Path:
        return self.file("bench.yaml", text)

    def results(self) -> Path:
        return fake_results(self.tmp / "results")


def base_args(command: str, c: Ctx) -> list:
    calib = ["--calib-samples", "8", "--max-length", "16", "--no-progress"]
    return {
        "allocate": ["allocate", "--model", c.model, *calib, "--no-plot", "--out", c.out],
        "layers": ["layers", "--model", c.model, *calib, "--out", c.out],
        "select-data": ["select-data", "--model", c.model, "--task", c.task, "--max-length", "16"]
        + ["--no-progress", "--out", c.out],
        "train": ["train", "--model", c.model, "--task", c.task, "--epochs", "1", "--batch-size", "8"]
        + [*calib, "--option", "plot=false", "--out", c.out],
        "evaluate": ["evaluate"],
        "bench": ["bench", "--dry-run", "--out", c.out],
        "report": ["report"],
    }[command]


BAD_CSV = 'text,label\n"open quote,1\n'
GOOD_YAML = "experiments:\n  - {name: e, kind: train, grid: {seed: [0]}}\n"
PROC_OUT = "/proc/senslora-faults/out"  # /proc refuses new entries even to root

CASES = {
    # allocate
    "allocate --avg-rank abc": Case("allocate", lambda c: ["--avg-rank", "abc"], "expected a number"),
    "allocate --calib-samples -3": Case(
        "allocate", lambda c: ["--calib-samples", "-3"], "expected a positive integer"
    ),
    "allocate --model missing path": Case(
        "allocate", lambda c: ["--model", c.tmp / "nope"], "neither a known alias"
    ),
    "allocate --calib missing file": Case("allocate", lambda c: ["--calib", c.tmp / "nope.txt"], "nope.txt"),
    "allocate --max-length 4": Case("allocate", lambda c: ["--max-length", "4"], "--max-length must be"),
    "allocate --out under a file": Case(
        "allocate", lambda c: ["--out", c.file() / "out"], "cannot write into"
    ),
    "allocate --out in /proc": Case("allocate", lambda c: ["--out", PROC_OUT], "cannot write into /proc"),
    "allocate --device-map missing file": Case(
        "allocate", lambda c: ["--device-map", c.tmp / "map.json"], "neither auto/balanced/sequential"
    ),
    "allocate --offload-folder without a map": Case(
        "allocate", lambda c: ["--offload-folder", c.tmp / "off"], "only applies with --device-map"
    ),
    "allocate --max-memory malformed": Case(
        "allocate", lambda c: ["--device-map", "auto", "--max-memory", "20GiB"], "DEVICE=SIZE"
    ),
    # train
    "train --epochs 0": Case("train", lambda c: ["--epochs", "0"], "expected a positive integer"),
    "train --lr abc": Case("train", lambda c: ["--lr", "abc"], "expected a number"),
    "train --layer-ratio 0": Case(
        "train", lambda c: ["--layers", "cka", "--layer-ratio", "0"], r"--layer-ratio must be .*\(0, 1\]"
    ),
    "train --layer-ratio 1.5": Case(
        "train", lambda c: ["--layers", "cka", "--layer-ratio", "1.5"], r"--layer-ratio must be .*\(0, 1\]"
    ),
    "train --layer-ratio keeps 0 blocks": Case(
        "train", lambda c: ["--layers", "cka", "--layer-ratio", "0.4"], "keeps 0 of 2 blocks"
    ),
    "train --data-keep 0": Case(
        "train", lambda c: ["--data-select", "quality", "--data-keep", "0"], r"--data-keep must be .*\(0, 1\]"
    ),
    "train --max-length 4": Case("train", lambda c: ["--max-length", "4"], "--max-length must be at least 8"),
    "train --avg-rank -2": Case("train", lambda c: ["--avg-rank", "-2"], "--avg-rank must be a number > 0"),
    "train task CSV missing": Case(
        "train", lambda c: ["--task", f"csv:{c.tmp / 'nope.csv'}"], "does not exist"
    ),
    "train task CSV not CSV": Case(
        "train", lambda c: ["--task", f"csv:{c.file('bad.csv', BAD_CSV)}"], "does not parse as CSV"
    ),
    "train --out under a file": Case("train", lambda c: ["--out", c.file() / "out"], "cannot write into"),
    "train --out is a file": Case("train", lambda c: ["--out", c.file()], "is not a folder"),
    "train --out in /proc": Case("train", lambda c: ["--out", PROC_OUT], "cannot write into /proc"),
    # evaluate (reads result.json)
    "evaluate corrupt result.json": Case(
        "evaluate",
        lambda c: [c.file("result.json", '{"status": "ok", "metr').parent],
        "cannot load the run result",
    ),
    # layers
    "layers --layer-ratio 0": Case("layers", lambda c: ["--layer-ratio", "0"], r"must be in \(0, 1\]"),
    "layers --layer-ratio 1.5": Case("layers", lambda c: ["--layer-ratio", "1.5"], r"must be in \(0, 1\]"),
    "layers --layer-ratio nan": Case(
        "layers", lambda c: ["--layer-ratio", "nan"], "expected a finite number"
    ),
    "layers --layer-ratio keeps 0 blocks": Case(
        "layers", lambda c: ["--layer-ratio", "0.4"], "keeps 0 of 2 blocks"
    ),
    "layers --out in /proc": Case("layers", lambda c: ["--out", PROC_OUT], "cannot write into /proc"),
    # select-data
    "select-data --data-keep 0": Case("select-data", lambda c: ["--data-keep", "0"], r"must be in \(0, 1\]"),
    "select-data --data-keep 1.5": Case(
        "select-data", lambda c: ["--data-keep", "1.5"], r"must be in \(0, 1\]"
    ),
    "select-data --max-length 4": Case(
        "select-data", lambda c: ["--max-length", "4"], "--max-length must be at least 8"
    ),
    "select-data --batch-size x": Case(
        "select-data", lambda c: ["--batch-size", "x"], "expected a positive integer"
    ),
    "select-data task file missing": Case(
        "select-data", lambda c: ["--task", f"jsonl:{c.tmp / 'nope.jsonl'}"], "does not exist"
    ),
    "select-data --out under a file": Case(
        "select-data", lambda c: ["--out", c.file() / "out"], "cannot write into"
    ),
    # bench
    "bench config missing": Case("bench", lambda c: [c.tmp / "nope.yaml"], "does not exist"),
    "bench config not YAML": Case(
        "bench", lambda c: [c.yaml("experiments: [a, : b\n  - {")], "not valid YAML"
    ),
    "bench config without experiments": Case(
        "bench", lambda c: [c.yaml("defaults: {}\n")], "non-empty `experiments:` list"
    ),
    "bench unknown kind": Case(
        "bench", lambda c: [c.yaml("experiments: [{name: x, kind: magic}]\n")], "unknown kind 'magic'"
    ),
    "bench grid not lists": Case(
        "bench", lambda c: [c.yaml("experiments: [{name: x, grid: {seed: 3}}]\n")], "non-empty lists"
    ),
    "bench --timeout abc": Case(
        "bench", lambda c: [c.yaml(GOOD_YAML), "--timeout", "abc"], "expected a number"
    ),
    "bench --out under a file": Case(
        "bench", lambda c: [c.yaml(GOOD_YAML), "--out", c.file() / "out"], "cannot create"
    ),
    # report
    "report folder missing": Case("report", lambda c: [c.tmp / "nope"], "holds no benchmark runs"),
    "report runs/ without results": Case(
        "report", lambda c: [(c.tmp / "res" / "runs").mkdir(parents=True) or c.tmp / "res"], "holds no result"
    ),
    "report corrupt result.json": Case(
        "report",
        lambda c: [_damage(c.results(), "result.json", '{"status": "ok", "met')],
        "unreadable result.json",
    ),
    "report result.json not a result": Case(
        "report", lambda c: [_damage(c.results(), "result.json", "[1, 2]")], "not a senslora result"
    ),
    "report bench.json missing": Case(
        "report", lambda c: [_damage(c.results(), "bench.json", None)], "unreadable result.json or bench.json"
    ),
}


def _damage(results: Path, name: str, text: str | None) -> Path:
    path = results / "runs" / "e" / "seed=0" / name
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(name, assets, tmp_path, capsys):
    case = CASES[name]
    c = Ctx(assets, tmp_path)
    argv = base_args(case.command, c) + case.extra(c)
    before = tree(tmp_path)
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, case.message)
    assert tree(tmp_path) == before  # no output folder, no half-written file, no .tmp-* leftover
    assert not Path(PROC_OUT).parent.exists()


def test_the_bad_input_table_covers_every_command():
    commands = {case.command for case in CASES.values()}
    assert {"allocate", "train", "layers", "select-data", "bench", "report"} <= commands
    assert len(CASES) >= 20


# ------------------------------------------------------------------- corrupt allocation.json
@pytest.fixture(scope="module")
def interrupted_senslora_run(assets, tmp_path_factory) -> tuple[Path, list]:
    """A senslora run folder interrupted after step 1: config, splits, allocation/, checkpoints/step-1."""
    c = Ctx(assets, tmp_path_factory.mktemp("interrupted"))
    argv = base_args("train", c) + ["--method", "senslora", "--save-every", "1"]

    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        if step == 1:
            raise Stop

    config = config_from_args(build_parser().parse_args([str(a) for a in argv]))
    with pytest.raises(Stop):
        train(config, c.out, progress=False, step_callback=stop)
    assert [p.name for p in checkpoints(c.out)] == ["step-1"]
    assert (c.out / "allocation" / "allocation.json").is_file()
    return c.out, argv


@pytest.mark.parametrize(
    "text",
    ['{"matrices": [{"name": "x", "ra', '{"matrices": 7, "total_rank": "many"}'],
    ids=["truncated", "wrong-schema"],
)
def test_resume_with_a_corrupt_allocation_json(text, interrupted_senslora_run, tmp_path, capsys):
    """`train --resume` reuses allocation/ (Allocation.load): a corrupt one is a one-line error and the
    unfinished run stays as it was (its checkpoint kept, no result.json)."""
    source, argv = interrupted_senslora_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    (run / "allocation" / "allocation.json").write_text(text)
    before = tree(tmp_path)
    code, _, err = run_cli([*argv, "--out", run, "--resume"], capsys)
    assert_one_error_line(code, err, "is not a valid allocation.json")
    assert tree(tmp_path) == before
    assert [p.name for p in checkpoints(run)] == ["step-1"] and not (run / "result.json").exists()


# ------------------------------------------------------------------------------- full disk
class _FullFile:
    """A file on a full disk: ``write`` stores half of the data, then fails with ENOSPC."""

    def __init__(self, fh, path: str):
        self._fh, self._path = fh, path

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def fileno(self):  # no side door for writers that use the descriptor (PIL)
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def _fail_writes_under(monkeypatch, root: Path) -> None:
    """Every file opened for writing under ``root`` through Python's ``open`` (pathlib, os.fdopen,
    shutil, matplotlib) gets half its data and then ENOSPC."""
    real_open = io.open
    prefix = str(root.resolve()) + os.sep

    def full_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if not any(flag in mode for flag in "wax+"):
            return fh
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.abspath(file)
        return _FullFile(fh, path) if path.startswith(prefix) else fh

    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr(builtins, "open", full_open)


@pytest.fixture(params=["failing-write", "tmpfs"])
def full_disk(request, tmp_path, monkeypatch):
    """(folder, fill): ``fill()`` makes the disk under ``folder`` full. ``failing-write`` patches
    Python's ``open``; ``tmpfs`` mounts a 1 MiB tmpfs and fills it (root on Linux only)."""
    root = tmp_path / "disk"
    root.mkdir()
    if request.param == "failing-write":
        if not Path("/proc/self/fd").is_dir():
            pytest.skip("needs /proc/self/fd")
        yield root, lambda: _fail_writes_under(monkeypatch, root)
        return
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a tmpfs needs root on Linux")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")

    def fill() -> None:
        fd = os.open(root / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)

    try:
        yield root, fill
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


FULL_DISK_COMMANDS = ["allocate", "layers", "select-data", "train", "bench", "report"]


@pytest.mark.parametrize("command", FULL_DISK_COMMANDS)
def test_full_disk_is_one_error_line_exit_2_and_nothing_written(command, full_disk, assets, tmp_path, capsys):
    root, fill = full_disk
    c = Ctx(assets, tmp_path)
    c.out = root / "out"
    if command == "bench":
        argv = ["bench", c.yaml(GOOD_YAML), "--out", c.out, "--dry-run"]
    elif command == "report":
        argv = ["report", fake_results(root / "results")]
    else:
        argv = base_args(command, c) + (["--save-every", "1"] if command == "train" else [])
    fill()
    before = tree(root)
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, "no space left on device|cannot write")
    assert tree(root) == before


def test_report_and_bench_work_on_the_same_inputs_when_the_disk_is_not_full(assets, tmp_path, capsys):
    """Control for the two full-disk cases that need no model: the inputs themselves are fine."""
    results = fake_results(tmp_path / "results")
    assert run_cli(["report", results], capsys)[0] == 0
    assert (results / "RESULTS.md").is_file() and (results / "plots" / "e.png").is_file()
    c = Ctx(assets, tmp_path)
    code, out, _ = run_cli(["bench", c.yaml(GOOD_YAML), "--out", c.out, "--dry-run"], capsys)
    assert code == 0 and "would run" in out and (c.out / "benchmark.yaml").is_file()


def _torch_save_on_full_disk(obj, f, *args, **kwargs):
    Path(f).write_bytes(b"PK\x03\x04partial")  # what torch.save leaves before it fails
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _safetensors_on_full_disk(tensors, filename, *args, **kwargs):
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\x08partial")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(
    ("target", "fake"),
    [("torch.save", _torch_save_on_full_disk), ("safetensors.torch.save_file", _safetensors_on_full_disk)],
    ids=["torch.save", "safetensors"],
)
def test_checkpoint_writers_failing_on_a_full_disk(target, fake, assets, tmp_path, monkeypatch, capsys):
    """The C++/Rust checkpoint writers do not raise OSError when the disk is full; the CLI still
    reports one line, and the run folder (no checkpoint yet) is removed."""
    monkeypatch.setattr(target, fake)
    c = Ctx(assets, tmp_path)
    code, _, err = run_cli(base_args("train", c) + ["--save-every", "1"], capsys)
    assert_one_error_line(code, err, "cannot write a checkpoint|no space left on device")
    assert tree(tmp_path) == {}


# ------------------------------------------------------------------------ SIGKILL and resume
def _senslora(*args) -> list[str]:
    return [sys.executable, "-m", "senslora", *[str(a) for a in args]]


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the process ended (status {proc.returncode}) before {what}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def test_train_killed_mid_epoch_resumes_to_the_same_metrics(assets, tmp_path, capsys):
    """`senslora train` in a subprocess, SIGKILLed after a mid-epoch checkpoint, then rerun with
    `--resume`: the same metrics and history as a run that was never interrupted (exactly, on the CPU).
    The uninterrupted run and the rerun use the CLI in-process (one interpreter start saved each)."""
    args = ["train", "--model", assets / "model", "--task", f"csv:{assets / 'task.csv'}"]
    args += ["--epochs", "2", "--batch-size", "4", "--max-length", "16", "--lr", "0.03", "--save-every", "2"]
    args += ["--option", "plot=false", "--no-progress", "--device", "cpu"]
    steps_per_epoch = 64 // 4  # 80 rows -> 64 train examples

    code, _, err = run_cli([*args, "--out", tmp_path / "whole"], capsys)
    assert code == 0, err
    expected = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert len(expected["history"]) == 2 and expected["steps"] == 2 * steps_per_epoch

    run = tmp_path / "killed"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen(
        _senslora(*args, "--out", run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        _wait_for(lambda: [p for p in checkpoints(run) if int(p.name[5:]) >= 2], proc, "checkpoint step-2")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "result.json").exists()
    last = int(checkpoints(run)[-1].name[5:])
    assert 2 <= last < steps_per_epoch  # killed inside the first epoch

    code, _, err = run_cli([*args, "--out", run], capsys)  # an unfinished run is not silently restarted
    assert_one_error_line(code, err, "unfinished run; pass --resume")
    code, _, err = run_cli([*args, "--out", run, "--resume"], capsys)
    assert code == 0, err
    result = json.loads((run / "result.json").read_text())
    assert result["resumed_at"] == [last] and result["steps"] == expected["steps"]
    assert result["metrics"] == expected["metrics"]
    assert result["history"] == expected["history"]
    assert not (run / "checkpoints").exists()
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_bench_killed_and_rerun_skips_finished_runs_and_loses_none(assets, tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text(
        f"""
defaults:
  train: {{model: "{assets / "model"}", task: "csv:{assets / "task.csv"}", epochs: 1, batch_size: 8,
          max_length: 16, calib_samples: 8, lr: 0.03, save_every: 2, options.plot: false, device: cpu}}
experiments:
  - name: faults
    kind: train
    grid: {{seed: [0, 1, 2]}}
"""
    )
    out = tmp_path / "results"
    folders = [out / "runs" / "faults" / f"seed={seed}" for seed in range(3)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen(
        _senslora("bench", config, "--out", out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    first_workers: set[int] = set()

    def first_done():
        first_workers.update(_children(proc.pid))
        try:
            return json.loads((folders[0] / "result.json").read_text())["status"] == "ok"
        except (OSError, ValueError):
            return False

    try:
        _wait_for(first_done, proc, "the first run's result.json")
        # Let the second run's worker start, then kill the bench process only (not its worker).
        workers = _wait_for(lambda: set(_children(proc.pid)) - first_workers, proc, "the second run")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # The worker of the interrupted run dies with the bench process: no orphan writes into its folder.
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers)
    assert not (folders[1] / "result.json").exists() and not (folders[2] / "result.json").exists()
    first = (folders[0] / "result.json").stat().st_mtime_ns, (folders[0] / "result.json").read_text()

    code, stdout, err = run_cli(["bench", config, "--out", out], capsys)
    assert code == 0, err
    assert "2 ok, 0 failed, 1 already done" in stdout and "seed=0 ..." not in stdout
    assert (
        (folders[0] / "result.json").stat().st_mtime_ns,
        (folders[0] / "result.json").read_text(),
    ) == first
    results = [json.loads((f / "result.json").read_text()) for f in folders]
    assert [r["status"] for r in results] == ["ok"] * 3 and [r["seed"] for r in results] == [0, 1, 2]
    assert all((f / "bench.json").is_file() and not (f / "checkpoints").exists() for f in folders)

    # Killed between a run's result.json and its bench.json: the rerun restores bench.json.
    (folders[0] / "bench.json").unlink()
    code, stdout, _ = run_cli(["bench", config, "--out", out], capsys)
    assert code == 0 and "0 ok, 0 failed, 3 already done" in stdout
    assert json.loads((folders[0] / "bench.json").read_text())["grid"] == {"seed": 0}
    assert run_cli(["report", out], capsys)[0] == 0
    assert "3 result files (3 ok, 0 failed)" in (out / "RESULTS.md").read_text()
