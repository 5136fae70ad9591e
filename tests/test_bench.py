"""The benchmark harness and report: config expansion, resume, statistics, and the quick benchmark."""

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from senslora.bench.forest import x_range
from senslora.bench.harness import check_runs, expand, load_config, resolve_params, run_benchmark
from senslora.bench.report import (
    build_report,
    detectable_effect,
    environment_section,
    load_runs,
    paired_interval,
    rank_agreement,
    seeds_for_half_width,
)
from senslora.cli.main import main
from senslora.core.errors import SensloraError
from senslora.core.pipeline import package_versions

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_grid_expands_with_mapping_values(tmp_path):
    cfg = load_config(
        write(
            tmp_path / "b.yaml",
            """
defaults: {train: {model: m, epochs: 1}}
experiments:
  - name: e
    grid:
      variant: [{}, {options.score: global, lr: 0.1}]
      seed: [0, 1]
    params: {method: senslora, epochs: 2}
""",
        )
    )
    runs = expand(cfg)
    assert [r.run_id for r in runs] == [
        "variant=default,seed=0",
        "variant=default,seed=1",
        "variant=lr:0.1+score:global,seed=0",
        "variant=lr:0.1+score:global,seed=1",
    ]
    assert runs[2].params == {
        "model": "m",
        "epochs": 2,
        "method": "senslora",
        "options.score": "global",
        "lr": 0.1,
        "seed": 0,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("experiments: []", "non-empty"),
        ("experiments: [{grid: {a: [1]}}]", "needs a `name:`"),
        ("experiments: [{name: a, kind: magic}]", "unknown kind"),
        ("experiments: [{name: a, grid: {x: 3}}]", "non-empty lists"),
        ("experiments: [{name: a}, {name: a}]", "appears twice"),
        ("experiments: [: :", "not valid YAML"),
        ("experiments: [{name: a, baseline: {m: x}, also_against: {m: y}}]", "list of settings"),
        ("experiments: [{name: a, also_against: [{m: y}]}]", "needs a `baseline:`"),
        ("experiments: [{name: a, reuse_from: [b]}, {name: b}]", "experiments before it"),
        ("experiments: [{name: a, reuse_from: a}]", "experiments before it"),
        ("experiments: [{name: a}, {name: b, kind: allocation-probe, reuse_from: [a]}]", "train experiments only"),
    ],
)
def test_bad_configs_are_user_errors(tmp_path, text, message):
    with pytest.raises(SensloraError, match=message):
        load_config(write(tmp_path / "b.yaml", text))


def _fake_run(out: Path, experiment: str, run_id: str, grid: dict, result: dict, baseline=None, kind="train"):
    folder = out / "runs" / experiment / run_id
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": "ok", **result}))
    (folder / "bench.json").write_text(
        json.dumps(
            {"experiment": experiment, "kind": kind, "grid": grid, "params": grid, "baseline": baseline or {}}
        )
    )


def _train_result(method, seed, acc, val, step=0.1, mem=100.0, lr=0.001):
    return {
        "method": method,
        "seed": seed,
        "primary_metric": "accuracy",
        "metrics": {"accuracy": acc},
        "history": [{"validation": {"accuracy": val}}],
        "trainable_params": 10,
        "budget_params": 10,
        "step_time_median_s": step,
        "peak_memory_mb": mem,
        "config": {"lr": lr},
    }


def test_best_of_picks_the_validation_winner_not_the_test_winner(tmp_path):
    _fake_run(tmp_path, "sweep", "a", {"lr": 0.001}, _train_result("lora", 0, acc=0.9, val=0.6, lr=0.001))
    _fake_run(tmp_path, "sweep", "b", {"lr": 0.002}, _train_result("lora", 0, acc=0.5, val=0.7, lr=0.002))
    assert resolve_params({"lr": "best-of:sweep", "x": 1}, tmp_path) == {"lr": 0.002, "x": 1}
    with pytest.raises(SensloraError, match="needs finished runs"):
        resolve_params({"lr": "best-of:missing"}, tmp_path)


def test_best_of_fills_placeholders_from_the_runs_own_parameters(tmp_path):
    """Each budget of a grid over avg_rank takes the rate its own sweep chose."""
    for rank, winner in ((1, 0.004), (8, 0.001)):
        for lr in (0.001, 0.004):
            _fake_run(tmp_path, f"val-r{rank}", f"lr={lr}", {"lr": lr},
                      _train_result("lora", 0, acc=0.5, val=0.9 if lr == winner else 0.6, lr=lr))
    for rank, winner in ((1, 0.004), (8, 0.001)):
        assert resolve_params({"lr": "best-of:val-r{avg_rank}", "avg_rank": rank}, tmp_path)["lr"] == winner
    with pytest.raises(SensloraError, match="placeholder {avg_rank} names no plain parameter"):
        resolve_params({"lr": "best-of:val-r{avg_rank}"}, tmp_path)
    # the whole config is checked before any run: a sweep a placeholder names must come earlier
    text = ("experiments:\n"
            "  - {name: val-r1, grid: {lr: [0.001]}, params: {avg_rank: 1}}\n"
            "  - {name: curve, grid: {avg_rank: [1, 2]}, params: {lr: 'best-of:val-r{avg_rank}'}}\n")
    cfg = load_config(write(tmp_path / "b.yaml", text))
    with pytest.raises(SensloraError, match=r"run curve/avg_rank=2: lr: best-of:val-r\{avg_rank\} names no experiment"):
        check_runs(cfg, expand(cfg))


def test_paired_interval_matches_the_t_formula():
    from scipy import stats

    d = [0.01, -0.02, 0.03, 0.015]
    m, lo, hi = paired_interval(d)
    ci = stats.t.interval(0.95, len(d) - 1, loc=sum(d) / 4, scale=stats.sem(d))
    assert m == pytest.approx(sum(d) / 4) and (lo, hi) == pytest.approx(ci)
    assert math.isnan(paired_interval([0.1])[1])


def test_detectable_effect_has_80_percent_power_by_simulation():
    from scipy import stats

    sd, n = 0.02, 6
    effect = detectable_effect(sd, n)
    rng = np.random.default_rng(0)
    draws = rng.normal(effect, sd, size=(20000, n))
    rejected = stats.ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05
    assert rejected.mean() == pytest.approx(0.8, abs=0.015)
    # Large n: the normal approximation (z_0.975 + z_0.8) * sd / sqrt(n).
    assert detectable_effect(1.0, 400) == pytest.approx((1.959964 + 0.841621) / 20, rel=0.01)
    assert math.isnan(detectable_effect(sd, 1))


def test_seeds_for_half_width_is_the_fewest_that_reach_it():
    sd, target = 0.0177, 0.015
    n = seeds_for_half_width(sd, target)

    def half(k):  # half-width of the interval of k pairs with sample sd exactly `sd`
        d = [sd * x for x in np.linspace(-1, 1, k) / np.std(np.linspace(-1, 1, k), ddof=1)]
        _, lo, hi = paired_interval(d)
        return (hi - lo) / 2

    assert half(n) <= target < half(n - 1)


def test_rank_agreement():
    rho, diff = rank_agreement({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 3, "c": 2})
    assert rho == pytest.approx(0.5) and diff == 2


def test_report_tables_paired_differences_and_targets(tmp_path):
    for seed, (l_acc, s_acc) in enumerate([(0.80, 0.82), (0.81, 0.80), (0.79, 0.83)]):
        _fake_run(
            tmp_path,
            "main",
            f"method=lora,seed={seed}",
            {"method": "lora", "seed": seed},
            _train_result("lora", seed, l_acc, 0.5, step=0.100, mem=100),
            {"method": "lora"},
        )
        _fake_run(
            tmp_path,
            "main",
            f"method=senslora,seed={seed}",
            {"method": "senslora", "seed": seed},
            _train_result("senslora", seed, s_acc, 0.5, step=0.110, mem=101),
            {"method": "lora"},
        )
    _fake_run(
        tmp_path,
        "cost",
        "x",
        {"estimator": "activation"},
        {
            "model": "m",
            "estimator": "activation",
            "examples": 8,
            "tokens": 80,
            "forward_s": 1.0,
            "allocation_s": 1.1,
            "ratio_to_forward": 1.1,
            "seconds_per_token": 0.01,
            "extra_peak_over_model": 0.1,
            "ranks": {"a": 1},
            "params": {"seed": 0},
        },
        kind="allocation-probe",
    )
    text = build_report(tmp_path).read_text()
    assert "| method=senslora | 3 | 0.8167 ± 0.0153 |" in text
    assert "| method=senslora | 3 | +0.0167 |" in text and "2/3" in text
    assert "| allocation / forward (cost: m, 8 examples, seed 0) | 1.10 | ≤ 1.25 | pass |" in text
    # the no-overhead targets come from cost experiments (a batch-size grid), not from every comparison
    assert "per-step time (main" not in text
    assert (tmp_path / "plots" / "main.png").exists()


def test_report_says_it_is_interim_while_the_config_plans_runs_without_an_ok_result(tmp_path):
    write(tmp_path / "benchmark.yaml",
          "experiments: [{name: main, grid: {method: [lora, senslora], seed: [0, 1, 2]}}, {name: later, grid: {seed: [0, 1]}}]")
    for seed in range(3):
        for method, acc in (("lora", 0.80), ("senslora", 0.81 + seed / 100)):
            if (method, seed) != ("senslora", 2):
                _fake_run(tmp_path, "main", f"method={method},seed={seed}", {"method": method, "seed": seed},
                          _train_result(method, seed, acc, 0.5), {"method": "lora"})
    text = build_report(tmp_path).read_text()
    assert ("**Interim report: 5 of the 8 runs that `benchmark.yaml` plans are ok.** Experiments with runs "
            "left (ok of planned): `main` 5 of 6, `later` 0 of 2.") in text
    _fake_run(tmp_path, "main", "method=senslora,seed=2", {"method": "senslora", "seed": 2},
              _train_result("senslora", 2, 0.83, 0.5), {"method": "lora"})
    for seed in range(2):
        _fake_run(tmp_path, "later", f"seed={seed}", {"seed": seed}, _train_result("lora", seed, 0.8, 0.5))
    assert "Interim report" not in build_report(tmp_path).read_text()


def test_report_checks_the_paired_half_width_an_experiment_declares(tmp_path):
    diffs = [0.02, -0.01, 0.04]
    for seed, d in enumerate(diffs):
        for method, acc in (("lora", 0.80), ("senslora", 0.80 + d)):
            _fake_run(tmp_path, "main", f"method={method},seed={seed}", {"method": method, "seed": seed},
                      _train_result(method, seed, acc, 0.5), {"method": "lora"})
    assert "target_half_width" not in build_report(tmp_path).read_text()  # nothing declared, nothing said
    _, lo, hi = paired_interval(diffs)
    write(tmp_path / "benchmark.yaml", "experiments: [{name: main, target_half_width: 0.1}]")
    text = build_report(tmp_path).read_text()
    assert f"Target half-width (`target_half_width`) 0.1 accuracy: **met** by every setting; the widest is {(hi - lo) / 2:.4f} (method=senslora)." in text
    write(tmp_path / "benchmark.yaml", "experiments: [{name: main, target_half_width: 0.015}]")
    text = build_report(tmp_path).read_text()
    pairs = seeds_for_half_width(statistics.stdev(diffs), 0.015)
    assert pairs > 3
    assert (f"Target half-width (`target_half_width`) 0.015 accuracy: **not met** by 1 of 1 settings "
            f"(method=senslora: {(hi - lo) / 2:.4f}, about {pairs} pairs at its sd).") in text
    for bad in ("0", "-0.01", "yes", "true"):
        with pytest.raises(SensloraError, match="target_half_width.*positive number"):
            load_config(write(tmp_path / "b.yaml", f"experiments: [{{name: a, target_half_width: {bad}}}]"))


def test_environment_section_shows_every_version_set_the_runs_recorded():
    same = {"torch": "2.13.0", "peft": "0.21.2"}
    runs = [{"versions": {**same, "git": "a" * 40}}, {"versions": {**same, "git": "b" * 40}}, {}]
    assert environment_section(runs) == [
        "## Environment", "", "torch 2.13.0, peft 0.21.2 (all 2 runs).", "",
        "Commits the runs were made from (runs): aaaaaaa (1), bbbbbbb (1).", ""]
    runs.append({"versions": {**same, "peft": "0.22.0", "git": "a" * 40}})
    text = "\n".join(environment_section(runs))
    assert "different library versions" in text and "- 2 runs: torch 2.13.0, peft 0.21.2" in text
    assert "- 1 run: torch 2.13.0, peft 0.22.0" in text and "aaaaaaa (2), bbbbbbb (1)" in text
    assert environment_section([{}]) == []


def test_report_marks_a_setting_whose_ranks_equal_the_baselines_as_no_evidence(tmp_path):
    ranks = {"q": 3, "v": 5}
    for seed in range(2):
        for score, got, acc in (("fused", ranks, 0.80), ("topk", ranks, 0.83), ("local", {"q": 4, "v": 4}, 0.81)):
            result = _train_result("senslora", seed, acc + seed / 100, 0.5)
            result["method_record"] = {"ranks": got if score != "local" or seed else ranks, "recipe": "robust"}
            _fake_run(tmp_path, "ablation", f"score={score},seed={seed}", {"score": score, "seed": seed},
                      result, {"score": "fused"})
    text = build_report(tmp_path).read_text()
    # Allocation shape table: the ranks column.
    assert "| score=topk | robust | – | – | – | – | – | **no change in ranks** |" in text
    assert "| score=local | robust | – | – | – | – | – | differ (1/2 seeds) |" in text
    # The paired table says the +0.03 of score=topk is not evidence; score=local is not marked.
    assert "| score=topk (**no change in ranks**: not evidence) | 2 | +0.0300 |" in text
    assert "| score=local | 2 | +0.0100 |" in text


def test_report_without_runs_and_with_corrupt_result(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    (tmp_path / "runs" / "e" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "e" / "r" / "result.json").write_text("{broken")
    assert main(["report", str(tmp_path)]) == 2
    assert "unreadable result.json" in capsys.readouterr().err


def test_quick_benchmark_every_method_produces_a_finite_metric(tmp_path):
    """benchmarks/quick.yaml end to end (a few minutes): every run ok, every metric finite; rerun skips all."""
    out = tmp_path / "quick"
    counts = run_benchmark(REPO / "benchmarks" / "quick.yaml", out)
    assert counts["failed"] == 0, [
        json.loads(p.read_text()).get("error") for p in out.glob("runs/*/*/result.json")
    ]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/*/result.json"))]
    methods = {r["method"] for r in results if "method" in r}
    assert methods == {
        "lora",
        "senslora",
        "adalora",
        "dylora",
        "houlsby",
        "pfeiffer",
        "eva",
        "cka",
        "tsqlora",
        "full",
    }
    for r in results:
        values = list(r["metrics"].values()) if "metrics" in r else [r["ratio_to_forward"]]
        assert values and all(math.isfinite(v) for v in values), r
    again = run_benchmark(REPO / "benchmarks" / "quick.yaml", out)
    assert again == {"ok": 0, "failed": 0, "skipped": len(results), "reused": 0, "stale": 0}
    assert "## Targets" in build_report(out).read_text()


def test_best_of_refuses_a_partial_sweep(tmp_path):
    _fake_run(tmp_path, "sweep", "a", {"lr": 0.001}, _train_result("lora", 0, acc=0.9, val=0.6, lr=0.001))
    failed = tmp_path / "runs" / "sweep" / "b"
    failed.mkdir()
    (failed / "result.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    with pytest.raises(SensloraError, match="needs every run"):
        resolve_params({"lr": "best-of:sweep"}, tmp_path)


def test_report_shows_selection_costs_against_a_forward_pass(tmp_path):
    result = _train_result("cka", 0, 0.8, 0.5)
    result["layer_selection"] = {"timings": {"forward": 2.0, "hidden_states": 2.0, "cka": 0.2}}
    result["data_selection"] = {"timings": {"forward": 1.0, "score": 0.9, "dedupe": 0.0}}
    _fake_run(tmp_path, "main", "method=cka,seed=0", {"method": "cka", "seed": 0}, result)
    text = build_report(tmp_path).read_text()
    assert "| CKA layer selection / one forward pass (1 runs) | 1.100 |" in text
    assert "| quality scoring / one forward pass (1 runs) | 0.900 |" in text


def test_per_method_overrides_set_params_without_changing_run_ids(tmp_path):
    cfg = load_config(
        write(
            tmp_path / "b.yaml",
            """
experiments:
  - name: e
    grid: {method: [lora, full], seed: [0]}
    params: {lr: 0.002}
    per_method: {full: {lr: "best-of:lr-full", epochs: 3}}
""",
        )
    )
    lora, full = expand(cfg)
    assert (lora.run_id, full.run_id) == ("method=lora,seed=0", "method=full,seed=0")
    assert lora.params["lr"] == 0.002 and "epochs" not in lora.params
    assert full.params["lr"] == "best-of:lr-full" and full.params["epochs"] == 3
    with pytest.raises(SensloraError, match="per_method"):
        load_config(write(tmp_path / "c.yaml", "experiments: [{name: a, per_method: {full: 3}}]"))


def _headline_runs(out: Path) -> None:
    """Two tasks, three methods, 4 seeds; senslora beats lora by 0.05 +- 0.01 on t1, loses on t2."""
    for seed in range(4):
        for task, (lora, sens, eva) in {"t1": (0.70, 0.75, 0.70), "t2": (0.80, 0.70, 0.80)}.items():
            for method, acc in {"lora": lora, "senslora": sens + 0.01 * (seed % 2), "eva": eva + 0.02 * seed}.items():
                grid = {"seed": seed, "task": task, "variant": {"method": method}}
                folder = out / "runs" / "main" / f"{task}-{method}-{seed}"
                folder.mkdir(parents=True)
                result = {**_train_result(method, seed, acc, acc), "task": task}
                (folder / "result.json").write_text(json.dumps({"status": "ok", **result}))
                meta = {"experiment": "main", "kind": "train", "grid": grid, "params": grid,
                        "baseline": {"variant": {"method": "lora"}}, "also_against": [{"variant": {"method": "eva"}}]}
                (folder / "bench.json").write_text(json.dumps(meta))


def _write_run(folder: Path, result: dict, meta: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": "ok", **result}))
    (folder / "bench.json").write_text(json.dumps(meta))


def test_the_readme_speaks_for_the_default_the_validation_sweeps_decided(tmp_path):
    settings = {"lora": ("lora", {}), "sens": ("senslora", {}), "sg": ("senslora", {"init": "gradient"})}
    for seed in range(3):
        for name, (method, options) in settings.items():
            variant = {"method": method, **{f"options.{k}": v for k, v in options.items()}}
            test = {"lora": 0.70, "sens": 0.72, "sg": 0.75}[name] + 0.01 * (seed % 2)
            grid = {"seed": seed, "task": "t1", "variant": variant}
            _write_run(tmp_path / "runs" / "main" / f"{name}-{seed}",
                       {**_train_result(method, seed, test, test), "task": "t1",
                        "config": {"method": method, "options": options, "lr": 0.001}},
                       {"experiment": "main", "kind": "train", "grid": grid, "params": grid,
                        "baseline": {"variant": {"method": "lora"}}, "also_against": [{"variant": {"method": "eva"}}]})
            if seed == 2 and name == "sg":
                continue  # the gradient init's sweep is one seed short: nothing is decided yet
            for lr in (0.0005, 0.001, 0.002, 0.004):
                val = {"lora": 0.80, "sens": 0.81, "sg": 0.83}[name] - (0.0 if lr == 0.001 else 0.05)
                result = {**_train_result(method, seed, val, val, lr=lr), "split": "validation",
                          "config": {"method": method, "options": options, "lr": lr, "avg_rank": 4,
                                     "task": "movie-polarity", "model": "minilm"}}
                grid = {"seed": seed, "lr": lr}
                _write_run(tmp_path / "runs" / f"val-{name}" / f"seed={seed},lr={lr}", result,
                           {"experiment": f"val-{name}", "kind": "train", "grid": grid, "params": grid})
    readme = tmp_path / "README.md"
    readme.write_text(f"<!-- senslora report {tmp_path} -->\n<!-- /senslora report -->\n")
    build_report(tmp_path, readme=readme)
    lines = [line for line in readme.read_text().splitlines() if line.startswith("- **senslora")]
    assert {line.split("**")[1] for line in lines} == {"senslora", "senslora, init=gradient"}
    assert "The default, chosen" not in readme.read_text()

    # the gradient init's third seed: every sweep has 3 seeds x 4 rates, and the rule decides
    for lr in (0.0005, 0.001, 0.002, 0.004):
        val = 0.83 - (0.0 if lr == 0.001 else 0.05)
        result = {**_train_result("senslora", 2, val, val, lr=lr), "split": "validation",
                  "config": {"method": "senslora", "options": {"init": "gradient"}, "lr": lr, "avg_rank": 4,
                             "task": "movie-polarity", "model": "minilm"}}
        _write_run(tmp_path / "runs" / "val-sg" / f"seed=2,lr={lr}", result,
                   {"experiment": "val-sg", "kind": "train", "grid": {"seed": 2, "lr": lr}, "params": {"seed": 2, "lr": lr}})
    text = build_report(tmp_path, readme=readme).read_text()
    named = ("The default, chosen by the decision rule on the validation sweeps before these runs "
             "(`senslora, init=gradient, rank 4`, mean validation score 0.8300): **senslora, init=gradient** in this table.")
    assert "**By the rule, the default becomes `senslora, init=gradient, rank 4`**" in text and named in text
    block = readme.read_text()
    lines = [line for line in block.splitlines() if line.startswith("- **senslora")]
    assert named in block and lines and all(line.startswith("- **senslora, init=gradient**") for line in lines)
    assert "- **senslora** against" in text  # RESULTS.md keeps every senslora setting's sentences


def test_headline_pairs_every_method_with_lora_and_eva_and_names_wins_and_losses(tmp_path):
    _headline_runs(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- senslora report {tmp_path} -->\nstale\n<!-- /senslora report -->\nend\n")
    text = build_report(tmp_path, readme=readme).read_text()
    head = text[text.index("## Headline") :]
    row = next(line for line in head.splitlines() if line.startswith("| senslora "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # columns: setting, t1 accuracy, vs lora, vs eva, t2 accuracy, vs lora, vs eva
    assert cells[1].startswith("0.755 ± 0.006 (4)")
    assert cells[2].startswith("+0.055 [") and cells[2].endswith("4/4 **win**")
    assert cells[5].startswith("-0.095 [") and cells[5].endswith("0/4 **loss**")
    lora_row = next(line for line in head.splitlines() if line.startswith("| lora "))
    assert "baseline" in lora_row
    eva_row = [c.strip() for c in next(line for line in head.splitlines() if line.startswith("| eva ")).split("|")]
    assert eva_row[4] == "baseline"
    # the README block is replaced, the rest kept byte for byte
    new = readme.read_text()
    assert new.startswith(f"intro\n<!-- senslora report {tmp_path} -->\nWritten by `senslora report")
    assert "stale" not in new and new.endswith("<!-- /senslora report -->\nend\n") and "+0.055 [" in new


def test_headline_is_one_table_over_experiments_and_says_where_senslora_wins_ties_and_loses(tmp_path):
    _headline_runs(tmp_path)
    chat = tmp_path / "runs" / "chat"
    for seed in range(3):  # a second headline experiment on another task: its columns join the table
        for method, acc in {"lora": 0.50, "senslora": 0.50 + 0.01 * (seed - 1), "eva": 0.40 + 0.01 * seed}.items():
            grid = {"seed": seed, "variant": {"method": method}}
            (chat / f"{method}-{seed}").mkdir(parents=True)
            result = {**_train_result(method, seed, acc, acc), "task": "t3"}
            (chat / f"{method}-{seed}" / "result.json").write_text(json.dumps({"status": "ok", **result}))
            meta = {"experiment": "chat", "kind": "train", "grid": grid, "params": grid,
                    "baseline": {"variant": {"method": "lora"}}, "also_against": [{"variant": {"method": "eva"}}]}
            (chat / f"{method}-{seed}" / "bench.json").write_text(json.dumps(meta))
    head = build_report(tmp_path).read_text().split("## Headline", 1)[1].split("\n## ", 1)[0]
    assert head.count("| setting |") == 1 and "### Every method against lora, eva (`chat`, `main`)" in head
    header = next(line for line in head.splitlines() if line.startswith("| setting |"))
    assert [h.strip() for h in header.strip("|").split("|")][1::3] == ["t3 accuracy", "t1 accuracy", "t2 accuracy"]
    rows = [line for line in head.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert [r.split("|")[1].strip() for r in rows] == ["lora", "eva", "senslora"]
    assert "- **senslora** against lora (primary metric): wins on t1; ties on t3; loses on t2." in head
    assert "- **senslora** against eva (primary metric): wins on t3; ties on t1" in head
    assert "**lora** against" not in head and "**eva** against" not in head
    for path in chat.glob("*/result.json"):  # the same task in two experiments: each column says which
        path.write_text(json.dumps({**json.loads(path.read_text()), "task": "t1"}))
    head = build_report(tmp_path).read_text().split("## Headline", 1)[1].split("\n## ", 1)[0]
    assert "| t1 accuracy (`chat`) |" in head and "| t1 accuracy (`main`) |" in head
    assert "- **senslora** against lora (primary metric): wins on t1 (`main`); ties on t1 (`chat`); loses on t2." in head


def test_headline_merges_a_setting_tuned_on_each_experiments_own_sweep_into_one_row(tmp_path):
    """The encoder and the decoder experiments each take their rates from their own sweeps
    (`best-of:val-enc-lora`, `best-of:val-dec-lora`): one row and one sentence per setting, and the
    comparisons named once."""
    for exp, task, shift in (("enc", "t1", 0.05), ("dec", "t2", -0.10)):
        tuned = {m: {"method": m, "lr": f"best-of:val-{exp}-{m}"} for m in ("lora", "senslora", "eva")}
        for seed in range(3):
            for method, acc in {"lora": 0.70, "senslora": 0.70 + shift + 0.01 * (seed % 2), "eva": 0.60}.items():
                grid = {"seed": seed, "variant": tuned[method]}
                _write_run(tmp_path / "runs" / exp / f"{method}-{seed}", {**_train_result(method, seed, acc, acc), "task": task},
                           {"experiment": exp, "kind": "train", "grid": grid, "params": {**grid, "task": task},
                            "baseline": {"variant": tuned["lora"]}, "also_against": [{"variant": tuned["eva"]}]})
    head = build_report(tmp_path).read_text().split("## Headline", 1)[1].split("\n## ", 1)[0]
    assert "### Every method against lora, eva (`dec`, `enc`)" in head
    rows = [line for line in head.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert [r.split("|")[1].strip() for r in rows] == ["lora", "eva", "senslora"]
    senslora = [c.strip() for c in rows[2].strip("|").split("|")]
    assert senslora[1].startswith("0.603 ± ") and senslora[4].startswith("0.753 ± ")  # t2 (dec), then t1 (enc)
    sentences = [line for line in head.splitlines() if line.startswith("- **senslora** against lora")]
    assert sentences == ["- **senslora** against lora (primary metric): wins on t1; loses on t2."]


def test_headline_names_the_runs_that_ended_with_a_warning(tmp_path):
    _headline_runs(tmp_path)
    assert "ended with a warning" not in build_report(tmp_path).read_text()
    for seed in (3, 1):
        path = tmp_path / "runs" / "main" / f"t2-lora-{seed}" / "result.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "warnings": ["predicts class 1 for all"]}))
    text = build_report(tmp_path).read_text()
    assert "Runs that ended with a warning (a classifier that predicts one class, or a regressor no better than the mean label): lora on t2: seed 1, 3." in text


def test_headline_leaves_out_an_experiment_marked_headline_false(tmp_path):
    _headline_runs(tmp_path)
    assert "### Every method against lora, eva (`main`)" in build_report(tmp_path).read_text()
    write(tmp_path / "benchmark.yaml", "experiments: [{name: main, headline: false}]")
    text = build_report(tmp_path).read_text()
    assert "## Headline" not in text and "### Every method against" not in text
    for method, extra in {"senslora": {"allocation_time_s": 1.0, "method_record": {"recipe": "robust"}},
                          "eva": {"method_record": {"eva_seconds": 4.0}}}.items():
        path = tmp_path / "runs" / "main" / f"t1-{method}-0" / "result.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    text = build_report(tmp_path).read_text()  # a hidden experiment's costs still count
    assert "### Every method against" not in text and "| main: t1, senslora robust | 1 | 0.25 |" in text
    assert "## Experiment `main` (training)" in text and "| task=t1, variant={'method': 'senslora'} | 4 |" in text
    with pytest.raises(SensloraError, match="true or false"):
        load_config(write(tmp_path / "b.yaml", "experiments: [{name: a, headline: maybe}]"))


def _set_fields(tmp_path: Path, pattern: str, **fields) -> None:
    for path in (tmp_path / "runs" / "main").glob(f"{pattern}/result.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_headline_forest_plot_pools_the_encoder_tasks_and_the_readme_shows_it_above_a_short_table(tmp_path):
    """plots/headline-forest.png is written; the README block links it (relative to the README),
    shows the short table (difference against lora with its interval, W/T/L) and the sentences, not
    the full table; the pooled row is the raw per-(task, seed) differences of t1 and t2 (one model's
    classification tasks) in one sample."""
    from scipy import stats

    _headline_runs(tmp_path)
    _set_fields(tmp_path, "*", problem="classification", model="enc")
    readme = tmp_path / "docs" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"intro\n<!-- senslora report {tmp_path} -->\nstale\n<!-- /senslora report -->\nend\n")
    text = build_report(tmp_path, readme=readme).read_text()
    png = tmp_path / "plots" / "headline-forest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![paired differences against lora, per task and setting](plots/headline-forest.png)" in text
    block = readme.read_text().split("-->\n", 1)[1]
    assert "](../plots/headline-forest.png)" in block and "](../RESULTS.md)" in block
    assert "| vs eva |" not in block and "± " not in block  # the full table stays in RESULTS.md
    assert "- **senslora** against lora (primary metric): wins on t1; loses on t2." in block
    # hand computation: senslora - lora per seed is 0.05 + 0.01 (seed % 2) on t1, -0.10 + 0.01 (seed % 2) on t2
    pooled = [0.05 + 0.01 * (s % 2) for s in range(4)] + [-0.10 + 0.01 * (s % 2) for s in range(4)]
    m, sd = np.mean(pooled), np.std(pooled, ddof=1)
    half = stats.t.ppf(0.975, len(pooled) - 1) * sd / math.sqrt(len(pooled))
    header, *rows = [line for line in block.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "setting", "t1 accuracy", "t2 accuracy", "tasks pooled (enc)", "W/T/L"]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows}
    assert set(cells) == {"eva", "senslora"}  # the baseline is the reference, not a row
    assert cells["senslora"][3] == f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]" == "-0.020 [-0.087, +0.047]"
    assert cells["senslora"][1].startswith("**+0.055 [") and cells["senslora"][2].startswith("**-0.095 [")
    assert cells["senslora"][4] == "1/0/1"
    assert "*tasks pooled (enc)*: per setting, the raw per-(task, seed) differences of that model's" in block
    assert "(t1, t2)" in block and "not rescaled" in block
    # the same numbers as the figure's rows
    from senslora.bench.report import _by_experiment, _headline_experiments, forest_groups

    groups, baseline = forest_groups(_headline_experiments(_by_experiment(load_runs(tmp_path)), frozenset()))
    assert baseline == "lora" and [g.label for g in groups] == ["t1", "t2", "tasks pooled (enc)"]
    row = next(r for r in groups[-1].rows if r.setting == "senslora")
    assert sorted(row.diffs) == pytest.approx(sorted(pooled))
    assert (row.mean, row.lo, row.hi) == pytest.approx((m, m - half, m + half))
    # each panel's own x range holds zero and every interval of its rows, and no more than a margin
    for group in groups:
        lo, hi = x_range(group)
        bounds = [0.0, *(v for r in group.rows for v in (r.lo, r.hi))]
        assert lo < min(bounds) and hi > max(bounds)
        assert hi - lo == pytest.approx(1.12 * (max(bounds) - min(bounds)))
    # no pooled row: a classification task on another model (a decoder's is not an encoder task),
    # a task whose runs do not name their model, or a generation task
    for fields in ({"model": "dec"}, {"model": None}, {"problem": "generation"}):
        _set_fields(tmp_path, "t2-*", **fields)
        groups, _ = forest_groups(_headline_experiments(_by_experiment(load_runs(tmp_path)), frozenset()))
        assert [g.label for g in groups] == ["t1", "t2"], fields
        _set_fields(tmp_path, "t2-*", problem="classification", model="enc")


def test_report_refuses_a_readme_without_markers_before_writing(tmp_path):
    _headline_runs(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SensloraError, match="no `<!-- senslora report"):
        build_report(tmp_path, readme=readme)
    assert readme.read_text() == "no markers\n" and not (tmp_path / "RESULTS.md").exists()


def test_cost_lines_give_every_method_against_lora_per_batch_size_and_senslora_against_eva(tmp_path):
    for seed in (0, 1):
        for b in (8, 16):
            for method, step in {"lora": 0.10, "senslora": 0.11 + 0.01 * seed, "full": 0.30}.items():
                r = _train_result(method, seed, 0.7, 0.7, step=step * b / 8, mem=100.0 * (2 if method == "full" else 1))
                r.update(steps=64 // b, peak_memory_measure="RSS growth")
                _fake_run(tmp_path, "latency", f"{method}-{b}-{seed}", {"seed": seed, "batch_size": b, "method": method}, r)
        for method in ("senslora", "eva"):
            r = {**_train_result(method, seed, 0.7, 0.7), "task": "t", "config": {"calib_samples": 64}}
            r["allocation_time_s"] = 2.0 if method == "senslora" else None
            r["method_record"] = {"recipe": "robust"} if method == "senslora" else {"eva_seconds": 8.0}
            _fake_run(tmp_path, "main", f"{method}-{seed}", {"seed": seed, "method": method}, r)
    text = build_report(tmp_path).read_text()
    assert "| senslora | 1.15 | 1.15 | 1.00 | 1.00 |" in text
    assert "| full | 3.00 | 3.00 | 2.00 | 2.00 |" in text
    assert ("Ratios of means over seeds; each run's step time is the median over its training steps (the lora runs "
            "took 8 steps at batch 8, 4 steps at batch 16); peak memory is, as the runs measured it: RSS growth.") in text
    assert "| senslora / lora per-step time (latency: batch_size=8) | 1.150 | ≤ 1.03 | **FAIL** |" in text
    assert "| senslora / lora peak memory (latency: batch_size=16) | 1.000 | ≤ 1.02 | pass |" in text
    assert "| main: t, senslora robust | 2 | 0.25 | 0.25 |" in text
    # Figure 4's analogue: step time and peak memory against the batch size, per method
    assert "![latency-cost](plots/latency-cost.png)" in text and (tmp_path / "plots" / "latency-cost.png").stat().st_size
    assert "-cost.png" not in text.split("## Experiment `main`", 1)[1]  # no batch-size grid: no cost plot
    # an EVA run copied from another experiment (`reuse_from`) was timed elsewhere: not paired
    for method in ("senslora", "eva"):
        r = {**_train_result(method, 2, 0.7, 0.7), "task": "t", "config": {"calib_samples": 64}}
        r["allocation_time_s"] = 2.0 if method == "senslora" else None
        r["method_record"] = {"recipe": "robust"} if method == "senslora" else {"eva_seconds": 1.0}
        _fake_run(tmp_path, "main", f"{method}-2", {"seed": 2, "method": method}, r)
    bench = tmp_path / "runs" / "main" / "eva-2" / "bench.json"
    bench.write_text(json.dumps({**json.loads(bench.read_text()), "reused_from": "pilot/eva-2"}))
    assert "| main: t, senslora robust | 2 | 0.25 | 0.25 |" in build_report(tmp_path).read_text()


def test_cost_of_variants_is_against_the_declared_baseline_per_setting(tmp_path):
    """A cost grid over variants (method + options, v3's shape): each variant is its own setting,
    named as the tables name it, against the declared baseline; every senslora variant meets the
    no-overhead targets or not on its own, and a LoRA variant gets no target."""
    variants = {
        ("lora", None): (0.10, 100.0),
        ("senslora", "gradient"): (0.10, 101.0),
        ("senslora", "zero"): (0.12, 100.0),
        ("lora", "gradient"): (0.20, 100.0),
    }
    for seed in (0, 1):
        for b in (8, 16):
            for (method, init), (step, mem) in variants.items():
                variant = {"method": method, **({"options.init": init} if init else {})}
                r = {**_train_result(method, seed, 0.7, 0.7, step=step * b / 8, mem=mem), "steps": 64 // b}
                _fake_run(tmp_path, "lat", f"{method}-{init}-{b}-{seed}", {"seed": seed, "batch_size": b,
                          "variant": variant}, r, baseline={"variant": {"method": "lora"}})
    text = build_report(tmp_path).read_text()
    assert "| setting | step time / lora, batch 8 | step time / lora, batch 16 |" in text
    assert "| senslora, init=gradient | 1.00 | 1.00 | 1.01 | 1.01 |" in text
    assert "| lora, init=gradient | 2.00 | 2.00 | 1.00 | 1.00 |" in text
    assert "| senslora, init=gradient / lora per-step time (lat: batch_size=16) | 1.000 | ≤ 1.03 | pass |" in text
    assert "| senslora, init=zero / lora per-step time (lat: batch_size=8) | 1.200 | ≤ 1.03 | **FAIL** |" in text
    assert "| senslora, init=gradient / lora peak memory (lat: batch_size=8) | 1.010 | ≤ 1.02 | pass |" in text
    assert "| lora, init=gradient / lora" not in text  # uniform LoRA with an init is no senslora claim
    assert "(the lora runs took 8 steps at batch 8, 4 steps at batch 16)" in text
    assert "![lat-cost](plots/lat-cost.png)" in text and (tmp_path / "plots" / "lat-cost.png").stat().st_size


def test_reuse_from_copies_a_run_with_the_identical_config_and_trains_the_rest(tmp_path, monkeypatch):
    import senslora.bench.harness as harness
    from senslora.training.config import TrainConfig

    params = {"model": "minilm", "task": "movie-polarity", "method": "eva", "epochs": 1, "seed": 0}
    out = tmp_path / "out"
    pilot = _train_result("eva", 0, acc=0.7, val=0.6)
    pilot["config"] = TrainConfig(**params, lr=0.001).to_dict()
    del pilot["config"]["data_format"]  # recorded before the field existed: its default is what ran
    pilot["versions"] = package_versions()  # made in this environment
    _fake_run(out, "pilot", "lr=0.001", {"lr": 0.001}, pilot)
    (out / "runs" / "pilot" / "lr=0.001" / "adapter.bin").write_text("weights")
    config = write(
        tmp_path / "b.yaml",
        f"""
experiments:
  - name: pilot
    grid: {{lr: [0.001]}}
    params: {json.dumps(params)}
  - name: main
    grid: {{lr: [0.001, 0.002]}}
    params: {json.dumps(params)}
    reuse_from: [pilot]
""",
    )
    trained = []
    monkeypatch.setattr(harness, "_run_worker", lambda spec, timeout: trained.append(json.loads(spec)) or "not run")
    counts = run_benchmark(config, out)
    assert counts == {"ok": 0, "failed": 1, "skipped": 1, "reused": 1, "stale": 0}
    assert [s["params"]["lr"] for s in trained] == [0.002]  # only the run with another config trains
    copy = out / "runs" / "main" / "lr=0.001"
    assert json.loads((copy / "result.json").read_text())["metrics"] == {"accuracy": 0.7}
    assert (copy / "adapter.bin").read_text() == "weights"
    assert json.loads((copy / "bench.json").read_text())["reused_from"] == "pilot/lr=0.001"
    assert not list((out / "runs" / "main").glob("*reuse-tmp*"))
    assert "1 of them are copies" in build_report(out).read_text()
    assert run_benchmark(config, out, only="^main/lr=0.001")["skipped"] == 1  # a copy is a finished run


def test_a_finished_run_whose_config_changed_is_kept_aside_and_run_again(tmp_path, monkeypatch):
    import senslora.bench.harness as harness
    from senslora.training.config import TrainConfig

    params = {"model": "minilm", "task": "movie-polarity", "method": "lora", "epochs": 1}
    out = tmp_path / "out"
    for lr, val in ((0.001, 0.6), (0.002, 0.7)):  # the sweep now picks 0.002
        sweep = _train_result("lora", 0, acc=0.5, val=val)
        sweep["config"] = TrainConfig(**params, lr=lr).to_dict()
        _fake_run(out, "sweep", f"lr={lr}", {"lr": lr}, sweep)
    old = TrainConfig(**params, lr=0.001).to_dict()
    old.pop("warmup_ratio")  # a field added after this run was recorded does not make it stale
    for seed, lr in ((0, 0.001), (1, 0.002)):
        done = _train_result("lora", seed, acc=0.7, val=0.6)
        done["config"] = {**old, "lr": lr, "seed": seed}
        _fake_run(out, "main", f"seed={seed}", {"seed": seed}, done)
    config = write(
        tmp_path / "b.yaml",
        f"""
experiments:
  - name: sweep
    grid: {{lr: [0.001, 0.002]}}
    params: {json.dumps(params)}
  - name: main
    grid: {{seed: [0, 1]}}
    params: {{<<: {json.dumps(params)}, lr: "best-of:sweep"}}
""",
    )
    assert run_benchmark(config, out, dry_run=True)["stale"] == 1
    assert (out / "runs" / "main" / "seed=0" / "result.json").is_file()  # a dry run moves nothing
    trained = []
    monkeypatch.setattr(harness, "_run_worker", lambda spec, timeout: trained.append(json.loads(spec)) or "not run")
    counts = run_benchmark(config, out)
    assert counts["stale"] == 1 and counts["skipped"] == 3 and counts["failed"] == 1
    assert [(t["params"]["seed"], t["params"]["lr"]) for t in trained] == [(0, 0.002)]
    kept = out / "runs" / "main" / ".stale" / "seed=0" / "result.json"
    assert json.loads(kept.read_text())["config"]["lr"] == 0.001
    assert not any(".stale" in str(r["_dir"]) for r in load_runs(out))


def test_a_method_s_implied_options_do_not_make_its_finished_runs_stale(tmp_path):
    """cka records ``layer_select: cka`` in its config although no parameter sets it."""
    from senslora.bench.harness import Run, _config_change
    from senslora.training.config import TrainConfig
    from senslora.training.train import recorded_config

    params = {"model": "minilm", "task": "movie-polarity", "method": "cka", "lr": 0.002}
    done = _train_result("cka", 0, acc=0.7, val=0.6)
    done["config"] = recorded_config(TrainConfig(**params)).to_dict()
    assert done["config"]["options"] == {"layer_select": "cka"}
    _fake_run(tmp_path, "main", "m", {}, done)
    run = Run("main", "train", params, {})
    assert _config_change(run, tmp_path / "runs" / "main" / "m", tmp_path) == ""  # no field differs
    run.params = {**params, "lr": 0.004}
    assert _config_change(run, tmp_path / "runs" / "main" / "m", tmp_path) == "lr 0.002 (now 0.004)"


def test_an_unfinished_run_of_another_config_is_started_over_not_resumed(tmp_path, monkeypatch):
    import senslora.training.train as training
    from senslora.bench.harness import run_one
    from senslora.training.config import TrainConfig
    from senslora.training.train import recorded_config

    params = {"model": "minilm", "task": "movie-polarity", "method": "cka", "lr": 0.002}
    calls = []
    monkeypatch.setattr(training, "train", lambda config, folder, resume, progress: calls.append(
        (config.lr, resume, folder.exists() and sorted(p.name for p in folder.iterdir()))))
    for lr, kept in ((0.002, ["checkpoints", "config.json"]), (0.001, False)):
        folder = tmp_path / f"run-{lr}"
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(recorded_config(TrainConfig(**{**params, "lr": lr})).to_dict()))
        run_one("train", params, folder)
        assert calls[-1] == (0.002, bool(kept), kept)  # same config: resumed; another lr: started over


def test_changed_runs_are_set_aside_before_any_run_starts(tmp_path, monkeypatch):
    import senslora.bench.harness as harness
    from senslora.training.config import TrainConfig

    params = {"model": "minilm", "task": "movie-polarity", "method": "lora", "epochs": 1}
    out = tmp_path / "out"
    done = _train_result("lora", 1, acc=0.7, val=0.6)
    done["config"] = TrainConfig(**params, lr=0.001, seed=1).to_dict()
    _fake_run(out, "main", "seed=1", {"seed": 1}, done)  # finished at lr 0.001; the config now says 0.002
    config = write(
        tmp_path / "b.yaml",
        f"experiments: [{{name: main, grid: {{seed: [0, 1]}}, params: {{<<: {json.dumps(params)}, lr: 0.002}}}}]",
    )
    seen = []
    monkeypatch.setattr(harness, "_run_worker", lambda spec, timeout: seen.append(
        (json.loads(spec)["params"]["seed"], (out / "runs" / "main" / "seed=1").exists())) or "not run")
    assert run_benchmark(config, out)["stale"] == 1
    assert seen == [(0, False), (1, False)]  # seed 1 was set aside before seed 0 started


def test_runs_of_other_library_versions_are_neither_reused_nor_mixed_into_an_experiment(tmp_path, monkeypatch):
    import senslora.bench.harness as harness
    from senslora.training.config import TrainConfig

    params = {"model": "minilm", "task": "movie-polarity", "method": "lora", "epochs": 1, "seed": 0}
    out = tmp_path / "out"
    old = _train_result("lora", 0, acc=0.7, val=0.6)
    old["config"] = TrainConfig(**params, lr=0.001).to_dict()
    old["versions"] = {**package_versions(), "transformers": "0.0.1"}
    _fake_run(out, "pilot", "lr=0.001", {"lr": 0.001}, old)
    trained = []
    monkeypatch.setattr(harness, "_run_worker", lambda spec, timeout: trained.append(json.loads(spec)) or "not run")
    main_only = write(tmp_path / "m.yaml", f"""
experiments:
  - name: pilot
    grid: {{lr: [0.001]}}
    params: {json.dumps(params)}
  - name: main
    grid: {{lr: [0.001]}}
    params: {json.dumps(params)}
    reuse_from: [pilot]
""")
    # the pilot is finished (nothing to add to it); main's run is not copied from another version
    counts = run_benchmark(main_only, out)
    assert counts["reused"] == 0 and [s["params"]["lr"] for s in trained] == [0.001]
    # adding a run to the pilot itself would mix versions in one experiment: refused before any run
    grown = write(tmp_path / "g.yaml", f"""
experiments:
  - name: pilot
    grid: {{lr: [0.001, 0.002]}}
    params: {json.dumps(params)}
""")
    trained.clear()
    with pytest.raises(SensloraError, match=r"'pilot'.*transformers 0\.0\.1 \(here .*new --out"):
        run_benchmark(grown, out)
    assert trained == []


def test_best_of_waits_for_every_grid_point_of_the_sweep_the_config_declares(tmp_path):
    """A sweep with runs still to go (say a later experiment was run first with --only) gives no
    value: the winner of part of a grid could differ from the winner of the whole."""
    (tmp_path / "benchmark.yaml").write_text(
        "experiments:\n"
        "  - name: sweep\n    kind: train\n    grid:\n      lr: [0.001, 0.002]\n"
        "    params: {method: lora, task: movie-polarity, eval_split: validation}\n"
    )
    _fake_run(tmp_path, "sweep", "lr=0.001", {"lr": 0.001}, _train_result("lora", 0, acc=0.9, val=0.6, lr=0.001))
    with pytest.raises(SensloraError, match=r"1 have not run yet \(e.g. lr=0.002\)"):
        resolve_params({"lr": "best-of:sweep"}, tmp_path)
    _fake_run(tmp_path, "sweep", "lr=0.002", {"lr": 0.002}, _train_result("lora", 0, acc=0.5, val=0.7, lr=0.002))
    assert resolve_params({"lr": "best-of:sweep"}, tmp_path)["lr"] == 0.002


def test_a_changed_default_init_makes_runs_that_left_it_to_the_default_stale_but_not_explicit_ones(
    tmp_path, monkeypatch
):
    """A run records the init it got (``method_record.init``); when --preset robust's init changes,
    a finished run that left the init to the default is another setting now, one that named it is not."""
    import senslora.core.presets as presets
    from senslora.bench.harness import Run, _config_change, reusable_run
    from senslora.training.config import TrainConfig
    from senslora.training.train import recorded_config

    monkeypatch.setitem(presets.PRESET_INITS, "robust", "zero")  # the runs were made under a zero default
    params = {"model": "minilm", "task": "movie-polarity", "method": "senslora", "lr": 0.002}
    for name, extra in (("default", {}), ("explicit", {"options": {"init": "zero"}})):
        done = _train_result("senslora", 0, acc=0.7, val=0.6)
        done["config"] = recorded_config(TrainConfig(**params, **extra)).to_dict()
        done["method_record"] = {"init": "zero"}
        done["versions"] = package_versions()  # made in this environment: reusable
        _fake_run(tmp_path, "main", name, {}, done)
    default, explicit = (tmp_path / "runs" / "main" / n for n in ("default", "explicit"))
    run = Run("main", "train", params, {})
    named = Run("main", "train", {**params, "options.init": "zero"}, {})
    assert _config_change(run, default, tmp_path) == "" and _config_change(named, explicit, tmp_path) == ""
    assert _config_change(run, explicit, tmp_path) == ""  # the same setting, spelled two ways

    monkeypatch.setitem(presets.PRESET_INITS, "robust", "gradient")
    assert _config_change(run, default, tmp_path) == "options {'init': 'zero'} (now {'init': 'gradient'})"
    assert _config_change(named, explicit, tmp_path) == "" and _config_change(named, default, tmp_path) == ""
    copier = Run("copy", "train", params, {}, reuse_from=["main"])
    assert reusable_run(copier, params, tmp_path) is None  # no zero-init run passes for the new default
    copier = Run("copy", "train", {**params, "options.init": "zero"}, {}, reuse_from=["main"])
    assert reusable_run(copier, copier.params, tmp_path) is not None
    # a run made before inits existed recorded none: it is compared as it was then
    old = json.loads((default / "result.json").read_text())
    del old["method_record"]
    (default / "result.json").write_text(json.dumps(old))
    assert _config_change(run, default, tmp_path) == ""
