"""The budget curve in the report: half-budget pairs, the one-sided bound, the verdict and the PNG."""

import json
import math
from pathlib import Path

import pytest
from scipy import stats as sps

from senslora.bench.budget import half_budget_pairs, is_budget_curve, margin_for
from senslora.bench.report import build_report, load_runs
from senslora.bench.stats import one_sided_lower

BASE = {"variant": {"method": "lora"}}


def _run(out: Path, method: str, rank: int, seed: int, acc: float):
    variant = {"method": method}
    folder = out / "runs" / "budget" / f"seed={seed},avg_rank={rank},variant={method}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({
        "status": "ok", "method": method, "seed": seed, "primary_metric": "accuracy", "split": "test",
        "metrics": {"accuracy": acc}, "trainable_params": 1000 * rank, "budget_params": 1000 * rank,
        "config": {"method": method, "avg_rank": rank, "lr": 0.001, "options": {}},
    }))
    grid = {"seed": seed, "avg_rank": rank, "variant": variant}
    (folder / "bench.json").write_text(json.dumps({"experiment": "budget", "kind": "train", "grid": grid,
                                                   "params": grid, "baseline": BASE}))


def test_one_sided_lower_is_the_t_bound():
    d = [0.01, -0.002, 0.004, 0.0]
    sd = (sum((x - sum(d) / 4) ** 2 for x in d) / 3) ** 0.5
    assert one_sided_lower(d) == pytest.approx(sum(d) / 4 - sps.t.ppf(0.95, 3) * sd / 2)
    assert math.isnan(one_sided_lower([0.1]))


def test_margin_is_half_a_point_on_the_metric_s_scale():
    assert margin_for("accuracy") == 0.005 and margin_for("mean(bleu,rouge1,rougeL)") == 0.5


def test_half_budget_pairs_and_verdicts(tmp_path):
    # senslora at rank 2 against lora at rank 4: differences +0.001, -0.001, +0.002, 0.0 -> a lower
    # bound above -0.005 (non-inferior); at rank 1 against lora's rank 2: -0.02 each time (not shown)
    for seed, noise in enumerate([0.001, -0.001, 0.002, 0.0]):
        for rank, acc in ((1, 0.70), (2, 0.75), (4, 0.80)):
            _run(tmp_path, "lora", rank, seed, acc)
        _run(tmp_path, "senslora", 1, seed, 0.73 + 0.001 * seed)
        _run(tmp_path, "senslora", 2, seed, 0.80 + noise)
    ok = load_runs(tmp_path)
    assert is_budget_curve(ok)
    pairs = half_budget_pairs(ok, BASE, "accuracy")
    ours = {rank: d for (key, rank), d in pairs.items() if "senslora" in str(key)}
    assert sorted(ours) == [2, 4]
    assert ours[4] == pytest.approx([0.001, -0.001, 0.002, 0.0])
    assert ours[2] == pytest.approx([-0.02, -0.019, -0.018, -0.017])
    # the control: lora at half its budget against itself at the full budget
    control = {rank: d for (key, rank), d in pairs.items() if "senslora" not in str(key)}
    assert control[4] == pytest.approx([-0.05] * 4) and control[2] == pytest.approx([-0.05] * 4)

    text = build_report(tmp_path).read_text()
    assert (tmp_path / "plots" / "budget-budget.png").is_file()
    section = text[text.index("Budget curve of"):]
    rows = [line for line in section.splitlines() if line.startswith(("| lora", "| senslora"))]
    assert any("2 vs 4" in r and "**non-inferior**" in r for r in rows)
    assert any("1 vs 2" in r and "not shown" in r for r in rows)
    controls = [r for r in rows if "(control: the baseline itself)" in r]
    assert len(controls) == 2 and all(r.startswith("| lora (control") and "not shown" in r for r in controls)
    assert ("On `budget`, each setting at half the baseline's rank against the baseline at the full rank: senslora: "
            "non-inferior at 1 of 2 budgets (rank 2 vs 4); lora (the control): non-inferior at 0 of 2 budgets.") in text


def test_an_experiment_with_one_rank_is_not_a_budget_curve(tmp_path):
    for seed in (0, 1):
        _run(tmp_path, "lora", 4, seed, 0.8)
        _run(tmp_path, "senslora", 4, seed, 0.8)
    assert not is_budget_curve(load_runs(tmp_path))
    assert "Budget curve" not in build_report(tmp_path).read_text()
