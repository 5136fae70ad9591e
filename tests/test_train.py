"""End-to-end runs on tiny random models saved to disk with a word-level tokenizer (no downloads)."""

import csv
import json
import random
from dataclasses import replace

import pytest
from tiny import tiny_bert, tiny_llama

from senslora.cli.main import main
from senslora.core.errors import SensloraError
from senslora.data.models import load_model
from senslora.training.evaluation import evaluate_model
from senslora.training.train import (
    CHECKPOINTS_DIR,
    TrainConfig,
    checkpoints,
    evaluate_run,
    load_task_for,
    train,
)

NUMBERS = "one two three four five six seven eight nine ten".split()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny BERT (with dropout, so resuming must restore the RNG) and LLaMA folders, and data files."""
    from conftest import make_word_tokenizer

    root = tmp_path_factory.mktemp("assets")
    tok = make_word_tokenizer()
    for name, model in (("bert", tiny_bert(hidden_dropout_prob=0.1)), ("llama", tiny_llama())):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rng = random.Random(0)
    with open(root / "sentiment.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for _ in range(60):
            positive = rng.random() < 0.5
            word = rng.choice(["good", "great"] if positive else ["bad", "awful"])
            filler = " ".join(rng.choice(["very", "not", "one", "two"]) for _ in range(rng.randint(0, 3)))
            writer.writerow([f"the film is {word} {filler}".strip(), "pos" if positive else "neg"])
    with open(root / "qa.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer"])
        for _ in range(40):
            a = rng.randrange(9)
            writer.writerow([f"what is {NUMBERS[a]} ?", NUMBERS[a + 1]])
    return root


def _config(assets, **kw):
    base = dict(
        method="lora",
        model=str(assets / "bert"),
        task=f"csv:{assets / 'sentiment.csv'}",
        epochs=2,
        batch_size=8,
        lr=3e-2,
        options={"plot": False},
    )
    base.update(kw)
    return TrainConfig(**base)


def _gen_config(assets, **kw):
    kw = dict(
        model=str(assets / "llama"),
        task=f"csv:{assets / 'qa.csv'}",
        text_column="question",
        label_column="answer",
        problem="generation",
        max_new_tokens=3,
        **kw,
    )
    return _config(assets, **kw)


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    return out, train(_config(assets), out, progress=False)


def test_result_json_and_run_folder(lora_run, assets):
    out, result = lora_run
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.json", "result.json", "splits.json"]
    assert json.loads((out / "result.json").read_text()) == result
    assert result["status"] == "ok" and result["method"] == "lora" and result["seed"] == 0
    assert set(result["metrics"]) == {"accuracy", "f1", "matthews", "eval_loss"}
    assert [h["epoch"] for h in result["history"]] == [1, 2] and "validation" in result["history"][0]
    assert result["steps"] == 2 * 6  # 48 train examples, batch 8
    # 12 LoRA matrices of rank 4 on a 16-wide BERT: 4 x (6 x 32 + 2 x 48) per block... = 1792.
    assert result["trainable_params"] == 4 * 2 * (4 * 32 + 2 * 48)
    assert result["trainable_params_total"] == result["trainable_params"] + 16 * 2 + 2  # + the classifier
    assert result["step_time_mean_s"] > 0 and result["step_time_median_s"] > 0 and result["train_time_s"] > 0
    assert result["peak_memory_mb"] >= 0 and result["peak_memory_measure"]
    assert result["config"]["lr"] == 3e-2 and "torch" in result["versions"]
    splits = json.loads((out / "splits.json").read_text())
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (48, 6, 6)
    assert splits["label_names"] == ["neg", "pos"]
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_same_seed_same_metrics_and_evaluate_reproduces(lora_run, assets, tmp_path):
    out, result = lora_run
    again = train(_config(assets), tmp_path / "again", progress=False)
    assert again["metrics"] == result["metrics"] and again["history"] == result["history"]
    evaluated = evaluate_run(out, merge_to=tmp_path / "merged")
    assert evaluated["reproduced"] and evaluated["metrics"] == result["metrics"]
    # The merged folder is a plain model with the same test metrics (up to merge rounding).
    model, tok = load_model(tmp_path / "merged", kind="classification", device="cpu")
    task = load_task_for(_config(assets))
    metrics = evaluate_model(model, tok, task.test, task, batch_size=8, max_length=128, device="cpu")
    assert metrics == pytest.approx(result["metrics"], abs=1e-5)


def test_resume_after_interrupt_equals_uninterrupted_run(assets, tmp_path):
    config = _config(assets, method="senslora", epochs=2, save_every=2)
    whole = train(config, tmp_path / "whole", progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_five(step):
        if step == 5:
            raise Interrupt

    run = tmp_path / "cut"
    with pytest.raises(Interrupt):
        train(config, run, progress=False, step_callback=stop_at_five)
    assert [p.name for p in checkpoints(run)] == ["step-2", "step-4"]
    assert not (run / "result.json").exists()
    with pytest.raises(SensloraError, match="unfinished run; pass --resume"):
        train(config, run, progress=False)
    with pytest.raises(SensloraError, match="these differ: lr"):
        train(replace(config, lr=1e-3), run, resume=True, progress=False)
    resumed = train(config, run, resume=True, progress=False)
    assert resumed["resumed_at"] == [4]
    assert resumed["metrics"] == whole["metrics"] and resumed["history"] == whole["history"]
    assert resumed["method_record"]["allocation_reused"] and not whole["method_record"]["allocation_reused"]
    assert not (run / CHECKPOINTS_DIR).exists()
    with pytest.raises(SensloraError, match="holds a completed run"):
        train(config, run, progress=False)


def test_only_the_last_two_checkpoints_are_kept(assets, tmp_path):
    config = _config(assets, epochs=1, save_every=1, keep_checkpoints=True)
    result = train(config, tmp_path / "run", progress=False)
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-5", "step-6"]
    files = sorted(p.name for p in (tmp_path / "run" / CHECKPOINTS_DIR / "step-6").iterdir())
    assert files == ["optimizer.pt", "rng.pt", "scheduler.pt", "state.json", "trainable.safetensors"]
    assert result["steps"] == 6


def test_senslora_spends_the_lora_budget(lora_run, assets, tmp_path):
    _, lora = lora_run
    rank_options = {"plot": False, "budget_mode": "rank"}  # the paper's rank budget
    sens = train(
        _config(assets, method="senslora", epochs=1, options=rank_options), tmp_path / "rank", progress=False
    )
    record = sens["method_record"]
    assert record["total_rank"] == 4 * 12 and sum(record["ranks"].values()) == 4 * 12
    assert sens["allocation_time_s"] > 0 and (tmp_path / "rank" / "allocation" / "allocation.json").is_file()
    assert sens["trainable_params"] == record["allocated_params"]
    # Default for training: the same parameter budget as uniform LoRA.
    params = train(_config(assets, method="senslora", epochs=1), tmp_path / "params", progress=False)
    assert params["method_record"]["budget_mode"] == "params"
    assert 0.9 * lora["trainable_params"] <= params["trainable_params"] <= lora["trainable_params"]


def test_full_fine_tuning_saves_and_reloads(assets, tmp_path):
    result = train(_config(assets, method="full", epochs=1), tmp_path / "full", progress=False)
    assert result["trainable_params_total"] == result["total_params"]
    assert evaluate_run(tmp_path / "full")["reproduced"]


def test_generation_task_on_a_causal_lm(assets, tmp_path):
    result = train(_gen_config(assets, method="senslora", epochs=1), tmp_path / "gen", progress=False)
    assert set(result["metrics"]) == {"bleu", "rouge1", "rouge2", "rougeL", "eval_loss"}
    assert result["primary_metric"] == "rougeL"
    assert evaluate_run(tmp_path / "gen")["reproduced"]


def test_cka_layers_and_quality_data_selection(lora_run, assets, tmp_path):
    _, lora = lora_run
    options = {
        "plot": False,
        "layer_select": "cka",
        "layer_ratio": 0.5,
        "data_select": "quality",
        "data_keep": 0.5,
    }
    result = train(_config(assets, epochs=1, options=options), tmp_path / "run", progress=False)
    assert len(result["layer_selection"]["kept"]) == 1  # 1 of the 2 blocks
    # The kept block gets uniform LoRA's whole-model budget (rank scaled by 2: equal-budget comparisons).
    assert result["trainable_params"] == lora["trainable_params"]
    assert result["layer_selection"]["budget_scale"] == 2
    counts = result["data_selection"]["counts"]  # duplicates dropped, then half of the rest kept
    assert counts["input"] == 48 and counts["kept"] == counts["scored"] // 2 == result["data"]["train"]
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert len(splits["train"]) == counts["kept"]
    assert (tmp_path / "run" / "cka" / "cka.json").is_file() and (tmp_path / "run" / "selection").is_dir()
    assert evaluate_run(tmp_path / "run")["reproduced"]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(method="nope"), "unknown method 'nope'"),
        (dict(task="nope"), "unknown task 'nope'"),
        (dict(label_column="target"), "no label column 'target'"),
        (dict(max_length=4), "--max-length must be at least 8"),
        (dict(max_train_samples=0), "--max-train-samples must be an integer >= 1"),
        (dict(options={"layer_select": "every"}), "--layers must be one of"),
        (dict(options={"data_keep": 1.5}), "--data-keep must be in \\(0, 1\\]"),
        (dict(problem="generation"), "needs a causal language model"),
        (dict(method="senslora", avg_rank=40), "--avg-rank 40 is above"),  # fails inside allocation
    ],
)
def test_bad_input_is_a_user_error_and_leaves_no_folder(assets, tmp_path, change, match):
    out = tmp_path / "run"
    with pytest.raises(SensloraError, match=match):
        train(_config(assets, **change), out, progress=False)
    assert not out.exists()


def test_bad_data_files_leave_no_folder(assets, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\n"open quote,1\n')
    few = tmp_path / "few.csv"
    few.write_text("text,label\n" + "".join(f"good,{i % 2}\n" for i in range(5)))
    for path, match in ((bad, "does not parse as CSV"), (few, "at least 10")):
        with pytest.raises(SensloraError, match=match):
            train(_config(assets, task=f"csv:{path}"), tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_cli_train_and_evaluate(assets, tmp_path, capsys):
    out = tmp_path / "cli"
    common = ["--model", str(assets / "bert"), "--task", f"csv:{assets / 'sentiment.csv'}", "--no-progress"]
    assert main(["train", "--method", "nope", *common, "--out", str(out)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err and not out.exists()
    assert main(["train", "--max-length", "4", *common, "--out", str(out)]) == 2
    assert main(["train", "--epochs", "1", "--option", "plot=false", *common, "--out", str(out)]) == 0
    assert main(["evaluate", str(out)]) == 0
    assert "metrics reproduce result.json" in capsys.readouterr().out
    assert main(["train", "--epochs", "1", *common, "--out", str(out)]) == 2
    assert "holds a completed run" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2


def test_collapsed_predictions_warn_on_the_summary_line_and_in_result_json(assets, tmp_path, capsys, monkeypatch):
    from senslora.training import evaluation

    real = evaluation._predict_and_loss

    def collapsed(model, batches, problem, device, progress):
        predictions, loss = real(model, batches, problem, device, progress)
        return [1] * len(predictions), loss

    monkeypatch.setattr(evaluation, "_predict_and_loss", collapsed)
    out = tmp_path / "collapsed"
    common = ["--model", str(assets / "bert"), "--task", f"csv:{assets / 'sentiment.csv'}", "--no-progress"]
    assert main(["train", "--epochs", "1", "--no-eval-each-epoch", *common, "--out", str(out)]) == 0
    summary = capsys.readouterr().out.splitlines()[0]
    assert "test accuracy=" in summary and "WARNING: the trained classifier predicts class 1 for all 6 test" in summary
    assert json.loads((out / "result.json").read_text())["warnings"] == [
        evaluation.collapse_warning("classification", [1] * 6, [0, 1, 0, 1, 0, 1], "test")
    ]
    assert evaluation.collapse_warning("classification", [0, 1, 1], [0, 1, 1], "test") is None
    # a regressor that predicts (about) the mean label has collapsed; one that tracks the labels has not
    flat = evaluation.collapse_warning("regression", [2.5, 2.5, 2.6, 2.4], [1.0, 2.0, 3.0, 4.0], "test")
    assert flat is not None and flat.startswith("the trained regressor is no better than predicting the mean")
    assert "R² " in flat and "4 test examples" in flat
    assert evaluation.collapse_warning("regression", [5.0] * 4, [1.0, 2.0, 3.0, 4.0], "test") is not None
    assert evaluation.collapse_warning("regression", [1.2, 2.1, 2.8, 3.9], [1.0, 2.0, 3.0, 4.0], "test") is None
    assert evaluation.collapse_warning("generation", ["a"] * 3, ["a", "b", "c"], "test") is None


def test_generation_task_with_an_encoder_is_refused_on_the_real_model(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SensloraError, match="chat-qa is a generation task and needs a causal language model"):
        train(TrainConfig(model="minilm", task="chat-qa"), out, progress=False)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "senslora"])
def test_real_minilm_on_movie_polarity(method, tmp_path):
    config = TrainConfig(
        method=method,
        model="minilm",
        task="movie-polarity",
        epochs=1,
        max_train_samples=64,
        max_eval_samples=32,
    )
    result = train(config, tmp_path / "run", progress=False)
    assert result["data"] == {"train": 64, "validation": 32, "test": 32, "splits_seed": 0}
    assert evaluate_run(tmp_path / "run")["reproduced"]


@pytest.mark.slow
def test_real_smollm2_on_chat_qa(tmp_path):
    config = TrainConfig(
        method="senslora",
        model="smollm2",
        task="chat-qa",
        avg_rank=8,
        epochs=1,
        batch_size=4,
        max_length=64,
        max_new_tokens=8,
        max_train_samples=8,
        max_eval_samples=4,
        calib_samples=8,
    )
    result = train(config, tmp_path / "run", progress=False)
    assert result["metrics"]["eval_loss"] > 0 and 0 <= result["metrics"]["rougeL"] <= 1
    assert evaluate_run(tmp_path / "run")["reproduced"]


def test_a_validation_only_run_never_reads_the_test_split(assets, tmp_path, monkeypatch):
    import senslora.training.train as train_module

    task = load_task_for(_config(assets))
    test_ids = {ex.id for ex in task.test}
    seen = []
    real = train_module._evaluate

    def spy(model, tokenizer, examples, *args, **kwargs):
        seen.append({ex.id for ex in examples})
        return real(model, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(train_module, "_evaluate", spy)
    config = _config(assets, eval_split="validation", eval_each_epoch=False)
    result = train(config, tmp_path / "sweep", progress=False)
    assert result["split"] == "validation" and seen and not any(ids & test_ids for ids in seen)
    model_ids = {ex.id for ex in task.validation}
    assert seen[-1] == model_ids
    evaluated = evaluate_run(tmp_path / "sweep")
    assert evaluated["reproduced"] and not any(ids & test_ids for ids in seen)
    with pytest.raises(SensloraError, match="eval-split"):
        _config(assets, eval_split="train").validate()
