"""Validation sweeps in the report: the winner rule, the edge flag, the decision table."""

import json
from pathlib import Path

import pytest

from senslora.bench.harness import resolve_params
from senslora.bench.report import build_report
from senslora.bench.sweeps import (
    decide,
    decision_rows,
    decision_verdict,
    is_zero_init,
    setting_identities,
    setting_identity,
    setting_key,
    sweep_cells,
    sweep_winner,
    validation_runs,
    winner_summary,
)


def _val_run(out: Path, experiment: str, method: str, seed: int, lr: float, acc: float, *, model="minilm",
             init=None, split="validation", rank=4):
    folder = out / "runs" / experiment / f"seed={seed},lr={lr:g}"
    folder.mkdir(parents=True)
    options = {"init": init} if init else {}
    result = {
        "status": "ok", "method": method, "seed": seed, "primary_metric": "accuracy", "split": split,
        "metrics": {"accuracy": acc}, "trainable_params": 10, "budget_params": 10,
        "config": {"method": method, "model": model, "task": "movie-polarity", "lr": lr, "avg_rank": rank,
                   "options": options},
    }
    (folder / "result.json").write_text(json.dumps(result))
    grid = {"seed": seed, "lr": lr}
    (folder / "bench.json").write_text(json.dumps({"experiment": experiment, "kind": "train", "grid": grid,
                                                   "params": grid, "baseline": {}}))


def test_winner_is_the_best_mean_and_ties_go_to_the_larger_value():
    assert sweep_winner({0.001: [0.7, 0.9], 0.002: [0.8, 0.79]}) == 0.001
    assert sweep_winner({0.001: [0.8], 0.002: [0.8]}) == 0.002
    with pytest.raises(ValueError):
        sweep_winner({})


def test_winner_summary_flags_a_winner_at_either_edge():
    assert winner_summary({1: [0.1], 2: [0.5], 4: [0.2]})["edge"] == ""
    assert winner_summary({1: [0.1], 2: [0.2], 4: [0.5]})["edge"] == "top"
    assert winner_summary({1: [0.6, 0.6], 2: [0.2], 4: [0.5]}) | {"mean": 0} == {
        "rate": 1, "mean": 0, "edge": "bottom", "seeds": 1, "rates": 3}


def test_best_of_and_the_report_pick_the_same_rate(tmp_path):
    # equal means at 0.001 and 0.002: both choose the larger rate (a string comparison of the JSON
    # values would rank "0.001" above "0.0005" but "0.01" below "0.002")
    for seed, (a, b, c) in enumerate([(0.5, 0.7, 0.7), (0.5, 0.7, 0.7)]):
        _val_run(tmp_path, "val", "lora", seed, 0.0005, a)
        _val_run(tmp_path, "val", "lora", seed, 0.001, b)
        _val_run(tmp_path, "val", "lora", seed, 0.002, c)
    from senslora.bench.report import load_runs

    cells = sweep_cells(validation_runs(load_runs(tmp_path)))
    (by_rate,) = cells.values()
    # resolve_params reads history or a validation split's metrics
    assert resolve_params({"lr": "best-of:val"}, tmp_path)["lr"] == winner_summary(by_rate)["rate"] == 0.002


def test_decision_table_ranks_settings_by_their_mean_best_over_tasks_each_at_its_own_rate(tmp_path):
    # lora: best 0.80 on the encoder (at 0.002), 0.70 on the decoder (at 0.001) -> 0.75
    # senslora+gradient: 0.78 (at 0.001) and 0.76 (at 0.0005) -> 0.77, ranked first although it
    # loses on the encoder; gora only has the encoder: partial, ranked last despite its 0.9
    for seed in (0, 1):
        for lr, acc in ((0.001, 0.7), (0.002, 0.8)):
            _val_run(tmp_path, "val-movie-lora", "lora", seed, lr, acc)
        for lr, acc in ((0.001, 0.70), (0.002, 0.6)):
            _val_run(tmp_path, "val-dec-lora", "lora", seed, lr, acc, model="smollm2")
        for lr, acc in ((0.001, 0.78), (0.002, 0.7)):
            _val_run(tmp_path, "val-movie-sg", "senslora", seed, lr, acc, init="gradient")
        for lr, acc in ((0.0005, 0.76), (0.001, 0.7)):
            _val_run(tmp_path, "val-dec-sg", "senslora", seed, lr, acc, model="smollm2", init="gradient")
        _val_run(tmp_path, "val-movie-gora", "gora", seed, 0.001, 0.9)
        # a test-split run never enters a sweep
        _val_run(tmp_path, "test-lora", "lora", seed, 0.004, 0.99, split="test")
        # a budget curve's sweep at rank 1: in the sweep tables, not in the decision
        _val_run(tmp_path, "val-budget-r1-lora", "lora", seed, 0.004, 0.95, rank=1)
    from senslora.bench.report import load_runs

    runs = validation_runs(load_runs(tmp_path))
    tasks, rows = decision_rows(sweep_cells(runs), setting_identities(runs))
    assert tasks == ["movie-polarity (minilm)", "movie-polarity (smollm2)"]
    assert [r["setting"] for r in rows] == ["senslora, init=gradient, rank 4", "lora, rank 4", "lora, rank 1",
                                            "gora, rank 4"]
    assert [round(r["mean"], 4) for r in rows] == [0.77, 0.75, 0.95, 0.9]
    assert [r["complete"] for r in rows] == [True, True, False, False]
    assert (rows[0]["method"], rows[0]["options"]) == ("senslora", {"init": "gradient"})
    assert rows[0]["per_task"]["movie-polarity (smollm2)"]["rate"] == 0.0005
    assert rows[0]["per_task"]["movie-polarity (smollm2)"]["edge"] == "bottom"

    text = build_report(tmp_path).read_text()
    section = text[text.index("## Validation sweeps"):text.index("## Experiment")]
    assert "0.7700" in section and "0.7600 @ 0.0005 (2x2, bottom)" in section
    assert "0.9000 (partial)" in section and "0.99" not in section
    assert "The decision rule applied to this table: **Not decided yet**: 1 of 1 senslora settings" in section
    assert "| lora, rank 1 | – | – | **0.9500 ± 0.0000 (2)** | top |" in section  # in its sweep table
    assert ("The decision compares settings at rank 4, where most were swept; the sweeps at other budgets "
            "(lora, rank 1) are in the tables above and take no part in it.") in section
    assert "| lora, rank 1 | 0.9500" not in section  # not in the decision table


def test_a_setting_is_what_ran_so_a_changed_default_init_never_mixes_two_settings():
    """Runs that left the init to the default are named by the init they recorded: zero init stays
    "senslora, rank 4" whether it was asked for or defaulted; a default that became gradient joins
    the explicit gradient runs."""
    def run(options, recorded):
        return {"config": {"method": "senslora", "avg_rank": 4, "options": options},
                "method_record": {"init": recorded}}

    assert setting_key(run({}, "zero")) == setting_key(run({"init": "zero"}, "zero")) == "senslora, rank 4"
    assert setting_key(run({}, "gradient")) == setting_key(run({"init": "gradient"}, "gradient"))
    assert setting_identity(run({}, "gradient"))["options"] == {"init": "gradient"}
    assert is_zero_init(setting_identity(run({}, "zero"))["options"]) and is_zero_init({})
    assert not is_zero_init({"init": "gradient"}) and not is_zero_init({"init": "zero", "rho": 2})
    assert setting_key({"config": {"method": "gora", "options": {}}}) == "gora"  # no init recorded


def _row(setting, means, *, seeds=3, rates=4, edge=""):
    per_task = {t: {"rate": 0.001, "mean": m, "edge": edge, "seeds": seeds, "rates": rates} for t, m in means.items()}
    method, *opts = setting.split(", ")[:-1]  # "senslora, init=gradient, rank 4" -> method, options
    return {"setting": setting, "method": method, "options": dict(o.split("=") for o in opts),
            "per_task": per_task, "mean": sum(means.values()) / len(means), "complete": True}


def test_the_verdict_applies_the_rule_once_every_senslora_sweep_can_decide():
    tasks = ["enc", "dec"]
    zero = _row("senslora, rank 4", {"enc": 0.77, "dec": 0.85})
    grad = _row("senslora, init=gradient, rank 4", {"enc": 0.78, "dec": 0.86})
    gora = _row("gora, rank 4", {"enc": 0.79, "dec": 0.87})
    verdict = decision_verdict(tasks, [gora, grad, zero])
    assert verdict.startswith("**By the rule, the default becomes `senslora, init=gradient, rank 4`**")
    assert "against 0.8100 for zero init (+0.0100)" in verdict and "Ranked above it: gora, rank 4 (0.8300)" in verdict
    # no senslora init beats zero init: zero init stays
    assert decision_verdict(tasks, [zero, grad]).startswith("**By the rule, zero init stays**: `senslora, rank 4`")
    assert decision_verdict(tasks, [zero, grad]).endswith("No finished setting ranks above it.")
    # the rule reads each row's method and options, not its printed name
    renamed = {**zero, "setting": "robust preset"}
    assert decision_verdict(tasks, [renamed, grad]).startswith("**By the rule, zero init stays**: `robust preset`")
    # a senslora winner at an edge: nothing is decided, and it says why
    edge = _row("senslora, init=pissa, rank 4", {"enc": 0.7, "dec": 0.7}, edge="top")
    thin = _row("lora, rank 4", {"enc": 0.9, "dec": 0.9}, seeds=2, rates=4)
    half = {**_row("eva, rank 4", {"enc": 0.7}), "complete": False}
    verdict = decision_verdict(tasks, [zero, grad, edge, thin, half])
    assert verdict.startswith("**Not decided yet**: 1 of 3 senslora settings cannot decide")
    assert "senslora, init=pissa, rank 4: enc winner at the top of the grid" in verdict
    assert "lora, rank 4" not in verdict and "eva" not in verdict
    # unfinished sweeps of other methods (too few seeds, a missing task) cannot change the default:
    # the rule decides, names them, and ranks only finished settings above the default
    verdict = decision_verdict(tasks, [thin, grad, zero, half])
    assert verdict.startswith("**By the rule, the default becomes `senslora, init=gradient, rank 4`**")
    assert "No finished setting ranks above it." in verdict and "(0.9000)" not in verdict
    assert "Still sweeping, which cannot change the default" in verdict
    assert "lora, rank 4: enc has 2 seeds x 4 rates" in verdict and "eva, rank 4: no dec sweep" in verdict
    assert decide(tasks, [thin, grad, zero, half])["best"] is grad
    assert set(decide(tasks, [thin, grad, zero, half])["others"]) == {"lora, rank 4", "eva, rank 4"}


def test_headline_names_the_sweep_each_setting_took_its_rate_from():
    from senslora.bench.report import _setting_name, _tuned_note

    def run(variant, lr):
        grid = {"seed": 0, "task": "movie-polarity", "variant": variant}
        return {"_meta": {"grid": grid, "params": {**variant, "lr": lr}}}

    exps = [("main", [run({"method": "lora"}, "best-of:val-lora"),
                      run({"method": "cka"}, "best-of:val-lora"),
                      run({"method": "eva"}, 0.001)], [])]
    (line, _) = _tuned_note(exps)
    assert "cka: lr from `val-lora`; lora: lr from `val-lora`" in line and "eva" not in line
    assert _tuned_note([("main", [run({"method": "eva"}, 0.001)], [])]) == []
    assert _setting_name({"variant": {"method": "senslora", "options.init": "gradient",
                                      "lr": "best-of:val-x"}}) == "senslora, init=gradient"


def test_init_cost_targets_use_issue_26s_rule_not_the_papers():
    from senslora.bench.costs import _init_cost_lines, _init_target_rows, targets_section

    meta = {"_meta": {"experiment": "init-cost", "kind": "allocation-probe", "grid": {}}, "status": "ok",
            "model": "m", "examples": 8, "params": {}}
    shared = {**meta, "estimator": "fisher", "init": "gradient", "init_pass": "shared",
              "ratio_to_forward_backward": 1.6, "sketch_over_adapter": 0.9, "allocation_s": 1.0, "forward_s": 0.2}
    extra = {**meta, "estimator": "activation", "init": "gradient", "init_pass": "extra", "init_s": 0.5,
             "allocation_s": 3.0, "forward_s": 1.0, "forward_backward_s": 2.0, "ratio_to_forward": 3.0,
             "sketch_over_adapter": 1.6, "peer_init_s": {"eva": 6.0}, "allocation_over_peer_init": {"eva": 0.5}}
    zero = {**meta, "estimator": "activation", "init": "zero", "allocation_s": 1.0, "forward_s": 1.0,
            "ratio_to_forward": 1.0}
    assert _init_target_rows(zero) == []
    (fb, mem) = _init_target_rows(shared)
    assert fb[1:] == ["1.60", "≤ 1.5", "**FAIL**"] and mem[-1] == "pass"
    (passes, mem) = _init_target_rows(extra)
    assert passes[1] == "0.75" and passes[-1] == "pass" and mem[-1] == "**FAIL**"  # 3 / (1 + 1.5 x 2)
    text = "\n".join(targets_section([shared, extra, zero]))
    # the paper's allocation / forward target is checked on the zero init only
    assert text.count("allocation / forward (") == 1
    assert "eva 6.00 s (0.50x)" in "\n".join(_init_cost_lines([extra, zero]))


def test_a_sweep_copied_by_reuse_from_keeps_its_seed_count(tmp_path):
    # val-budget-r4 copies val-movie's runs (same config): the copies are the same seeds, not new ones
    for seed, acc in ((0, 0.70), (1, 0.80)):
        _val_run(tmp_path, "val-movie-lora", "lora", seed, 0.001, acc)
        _val_run(tmp_path, "val-budget-r4-lora", "lora", seed, 0.001, acc)
        copy = tmp_path / "runs" / "val-budget-r4-lora" / f"seed={seed},lr=0.001" / "bench.json"
        copy.write_text(json.dumps({**json.loads(copy.read_text()), "reused_from": f"val-movie-lora/seed={seed},lr=0.001"}))
    # a copy whose original is gone (not in this folder) still counts
    _val_run(tmp_path, "val-budget-r4-lora", "lora", 2, 0.001, 0.75)
    lone = tmp_path / "runs" / "val-budget-r4-lora" / "seed=2,lr=0.001" / "bench.json"
    lone.write_text(json.dumps({**json.loads(lone.read_text()), "reused_from": "deleted/seed=2,lr=0.001"}))
    from senslora.bench.report import load_runs

    (by_rate,) = sweep_cells(validation_runs(load_runs(tmp_path))).values()
    assert sorted(by_rate[0.001]) == [0.70, 0.75, 0.80]
    section = build_report(tmp_path).read_text()
    assert "**0.7500 ± 0.0500 (3)**" in section
