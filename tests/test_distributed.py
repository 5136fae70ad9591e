"""Two CPU processes (torchrun, gloo) against one: allocation and training give the same results.

Each launch starts two fresh Python processes (~10 s of imports each on a small machine), so the
default tier runs two launches: one for every allocation check (library and CLI), one for
``senslora train``; resuming and the hook methods (AdaLoRA, DyLoRA) are in the slow tier.
"""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_bert, token_batches, write_sentiment_csv

from senslora.cli.main import main
from senslora.core.estimators import estimate_diagonals
from senslora.core.pipeline import allocate
from senslora.core.targets import find_targets
from senslora.training.train import TrainConfig, train

TESTS = Path(__file__).parent
# (estimator, calibration batches): 5 batches split 3 / 2; 1 batch leaves rank 1 without any.
CASES = (("activation", 5), ("activation", 1), ("fisher", 5), ("fisher-batch", 5), ("hutchinson", 5))
SEED = 3

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

ALLOCATE_WORKER = f"""
import sys
from pathlib import Path

import torch
from tiny import tiny_bert, token_batches

from senslora.cli.main import main
from senslora.core.distributed import current
from senslora.core.estimators import estimate_diagonals
from senslora.core.pipeline import allocate
from senslora.core.targets import find_targets

out, model_dir, calib = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
dist = current()
results = {{}}
for estimator, n_batches in {CASES!r}:
    model, batches = tiny_bert(), token_batches(n_batches=n_batches, batch_size=4)
    diagonals = estimate_diagonals(estimator, model, batches, find_targets(model), seed={SEED}, progress=False)
    alloc = allocate(model, batches, estimator=estimator, seed={SEED}, progress=False)
    alloc.save(out / "alloc" / f"{{estimator}}-{{n_batches}}", plot=False)
    results[(estimator, n_batches)] = {{
        "diagonals": {{name: d.values for name, d in diagonals.items()}},
        "ranks": alloc.ranks,
        "calibration": alloc.calibration,
        "timings": alloc.timings,
    }}
for estimator in ("activation", "fisher"):  # --init gradient: an extra pass, or shared with fisher's
    model, batches = tiny_bert(), token_batches(n_batches=5, batch_size=4)
    alloc = allocate(model, batches, estimator=estimator, init="gradient", seed={SEED}, progress=False)
    results[("init", estimator)] = {{
        "sketch": alloc.sketch.mean(alloc.sketch.num_examples), "ranks": alloc.ranks, "pass": alloc.init_pass,
    }}
torch.save({{"rank": dist.rank, "world": dist.world_size, "results": results}}, out / f"rank{{dist.rank}}.pt")
code = main(["allocate", "--model", model_dir, "--calib", calib, "--calib-samples", "20", "--batch-size", "4",
             "--max-length", "16", "--avg-rank", "2", "--no-progress", "--no-plot", "--out", str(out / "cli")])
sys.exit(code)
"""


def _cli_allocate_args(model_dir: Path, calib: Path, out: Path) -> list[str]:
    return [
        "allocate",
        "--model",
        str(model_dir),
        "--calib",
        str(calib),
        "--calib-samples",
        "20",
        "--batch-size",
        "4",
        "--max-length",
        "16",
        "--avg-rank",
        "2",
        "--no-progress",
        "--no-plot",
        "--out",
        str(out),
    ]


def torchrun(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``args`` (a script or ``-m module ...``) in 2 CPU processes; fail with their stderr."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
    }
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny BERT folder with a word-level tokenizer and a labelled sentiment CSV."""
    from conftest import make_word_tokenizer

    root = tmp_path_factory.mktemp("dist-assets")
    tiny_bert().save_pretrained(root / "bert")
    make_word_tokenizer().save_pretrained(root / "bert")
    write_sentiment_csv(root / "sentiment.csv")
    return root


@pytest.fixture(scope="module")
def two_processes(assets, tmp_path_factory):
    """One 2-process launch of every allocation case and of `senslora allocate`."""
    out = tmp_path_factory.mktemp("dist-allocate")
    script = out / "worker.py"
    script.write_text(ALLOCATE_WORKER)
    proc = torchrun([str(script), str(out), str(assets / "bert"), str(assets / "sentiment.csv")], out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return out, ranks, proc.stdout


def _single(estimator: str, n_batches: int):
    model, batches = tiny_bert(), token_batches(n_batches=n_batches, batch_size=4)
    diagonals = estimate_diagonals(estimator, model, batches, find_targets(model), seed=SEED, progress=False)
    alloc = allocate(model, batches, estimator=estimator, seed=SEED, progress=False)
    return diagonals, alloc


@pytest.mark.parametrize("case", CASES, ids=[f"{e}-{n}" for e, n in CASES])
def test_two_processes_equal_one_process(two_processes, case):
    # activation / fisher / fisher-batch: the same sums in another order; hutchinson: the same
    # probe per batch (seeded by (seed, batch index)), so the same diagonals and ranks too.
    _, ranks, _ = two_processes
    got = ranks[0]["results"][case]
    diagonals, alloc = _single(*case)
    assert ranks[0]["world"] == 2 and got["calibration"]["processes"] == 2
    assert set(got["diagonals"]) == set(diagonals)
    for name, diagonal in diagonals.items():
        expected = diagonal.values
        torch.testing.assert_close(
            got["diagonals"][name], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())
        )
    assert got["ranks"] == alloc.ranks


@pytest.mark.parametrize("estimator", ["activation", "fisher"])
def test_gradient_init_sketch_under_two_processes_equals_one_process(two_processes, estimator):
    # The sketch G A^T is a sum over batches, all-reduced before the division: the same as one process.
    _, ranks, _ = two_processes
    got = ranks[1]["results"][("init", estimator)]
    model, batches = tiny_bert(), token_batches(n_batches=5, batch_size=4)
    alloc = allocate(model, batches, estimator=estimator, init="gradient", seed=SEED, progress=False)
    expected = alloc.sketch.mean(alloc.sketch.num_examples)
    assert got["ranks"] == alloc.ranks and got["pass"] == alloc.init_pass
    assert set(got["sketch"]) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got["sketch"][name], value, rtol=1e-5, atol=1e-6 * float(value.abs().max()))


def test_every_process_returns_the_same_and_the_main_writes_once(two_processes):
    out, ranks, stdout = two_processes
    assert [r["rank"] for r in ranks] == [0, 1]
    for case in CASES:
        a, b = ranks[0]["results"][case], ranks[1]["results"][case]
        assert a["ranks"] == b["ranks"] and a["timings"] == b["timings"]  # broadcast from the main
        assert all(torch.equal(a["diagonals"][n], b["diagonals"][n]) for n in a["diagonals"])
    # One folder per case, complete, and no temporary folder left behind.
    assert sorted(p.name for p in (out / "alloc").iterdir()) == sorted(f"{e}-{n}" for e, n in CASES)
    assert all((out / "alloc" / f"{e}-{n}" / "allocation.json").is_file() for e, n in CASES)
    assert stdout.count("wrote ") == 1  # the CLI reports from the main process only


def test_cli_allocate_under_two_processes_equals_one_process(two_processes, assets, tmp_path):
    out, _, _ = two_processes
    assert main(_cli_allocate_args(assets / "bert", assets / "sentiment.csv", tmp_path / "one")) == 0
    one = json.loads((tmp_path / "one" / "allocation.json").read_text())
    two = json.loads((out / "cli" / "allocation.json").read_text())
    assert [(m["name"], m["rank"]) for m in two["matrices"]] == [
        (m["name"], m["rank"]) for m in one["matrices"]
    ]
    assert two["calibration"]["processes"] == 2 and "processes" not in one["calibration"]
    assert {k: v for k, v in two["calibration"].items() if k != "processes"} == one["calibration"]


TRAIN_ARGS = [
    "--method",
    "senslora",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--lr",
    "3e-2",
    "--save-every",
    "2",
]


def test_two_process_train_writes_one_result(assets, tmp_path):
    args = [
        "train",
        "--model",
        str(assets / "bert"),
        "--task",
        f"csv:{assets / 'sentiment.csv'}",
        *TRAIN_ARGS,
    ]
    proc = torchrun(
        ["-m", "senslora", *args, "--no-progress", "--option", "plot=false", "--out", "run"], tmp_path
    )
    assert proc.stdout.count("wrote run") == 1
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("result.json")] == ["run/result.json"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "adapter",
        "allocation",
        "config.json",
        "result.json",
        "splits.json",
    ]
    two = json.loads((tmp_path / "run" / "result.json").read_text())
    config = TrainConfig(
        method="senslora",
        model=str(assets / "bert"),
        task=f"csv:{assets / 'sentiment.csv'}",
        epochs=2,
        batch_size=8,
        lr=3e-2,
        save_every=2,
        options={"plot": False},
    )
    one = train(config, tmp_path / "one", progress=False)
    # Same steps over the same batches (split 4 + 4 over the processes), same allocation, and the
    # same training up to float summation order.
    assert two["processes"] == 2 and one["processes"] == 1 and two["steps"] == one["steps"] == 12
    assert two["method_record"]["ranks"] == one["method_record"]["ranks"]
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["validation"] == pytest.approx(b["validation"], rel=1e-4)
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-4)
    assert two["step_time_median_s"] > 0 and two["peak_memory_mb"] >= 0


RESUME_WORKER = """
import json, sys
from pathlib import Path

from senslora.training.train import TrainConfig, train

out, task = Path(sys.argv[1]), sys.argv[2]
base = dict(model=str(out / "bert"), task=task, epochs=1, batch_size=8, lr=3e-2, options={"plot": False})
results = {}
for method in ("adalora", "dylora"):
    results[method] = train(TrainConfig(method=method, **base), out / method, progress=False)
# With dropout: an exact resume needs every process's RNG state from the checkpoint.
config = TrainConfig(method="senslora", save_every=2, **dict(base, model=str(out / "dropout"), epochs=2))
results["whole"] = train(config, out / "whole", progress=False)


class Interrupt(Exception):
    pass


def stop_at_five(step):
    if step == 5:
        raise Interrupt


try:
    train(config, out / "cut", progress=False, step_callback=stop_at_five)
except Interrupt:
    pass
results["resumed"] = train(config, out / "cut", resume=True, progress=False)
(out / "results.json").write_text(json.dumps(results))
"""


@pytest.mark.slow
def test_two_process_resume_and_hook_methods(tmp_path):
    from conftest import make_word_tokenizer

    # Without dropout (the hook methods are compared with one process, whose dropout masks differ),
    # and with dropout (for the resume).
    for name, model in (("bert", tiny_bert()), ("dropout", tiny_bert(hidden_dropout_prob=0.1))):
        model.save_pretrained(tmp_path / name)
        make_word_tokenizer().save_pretrained(tmp_path / name)
    with open(tmp_path / "data.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        rng = random.Random(1)
        for _ in range(60):
            positive = rng.random() < 0.5
            writer.writerow([f"the film is {'good' if positive else 'bad'}", "pos" if positive else "neg"])
    script = tmp_path / "worker.py"
    script.write_text(RESUME_WORKER)
    torchrun([str(script), str(tmp_path), f"csv:{tmp_path / 'data.csv'}"], tmp_path, 600)
    results = json.loads((tmp_path / "results.json").read_text())
    resumed, whole = results["resumed"], results["whole"]
    assert resumed["resumed_at"] == [4] and resumed["processes"] == 2
    assert resumed["history"] == whole["history"] and resumed["metrics"] == whole["metrics"]
    # AdaLoRA (update_and_allocate) and DyLoRA (a random rank per step) on the unwrapped model,
    # identical on both processes: the same run as one process, up to float summation order.
    for method in ("adalora", "dylora"):
        config = TrainConfig(
            method=method,
            model=str(tmp_path / "bert"),
            task=f"csv:{tmp_path / 'data.csv'}",
            epochs=1,
            batch_size=8,
            lr=3e-2,
            options={"plot": False},
        )
        one, two = train(config, tmp_path / f"one-{method}", progress=False), results[method]
        assert two["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=1e-5)
        assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-4)
        assert two["method_record"].get("rank_pattern") == one["method_record"].get("rank_pattern")
