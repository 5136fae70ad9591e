import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_bert, tiny_llama

from senslora.core.errors import SensloraError
from senslora.core.losses import per_example_loss
from senslora.data.examples import Example, make_batches
from senslora.data.tasks import PROBLEM_METRICS, TaskData
from senslora.training.evaluation import compute_metrics, evaluate_model, generate_answers


def test_binary_classification_metrics_by_hand():
    # TP = 2 (0, 3), FP = 1 (2), FN = 1 (4), TN = 1 (1).
    m = compute_metrics("classification", [1, 0, 1, 1, 0], [1, 0, 0, 1, 1])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 / 3)  # precision = recall = 2/3
    assert m["matthews"] == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))


def test_multiclass_f1_is_macro():
    # class 0: F1 1; class 1: P 1, R 1/2 -> 2/3; class 2: P 1/2, R 1 -> 2/3.
    m = compute_metrics("classification", [0, 1, 2, 2], [0, 1, 1, 2], num_labels=3)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(3 / 4)
    # A class never seen in either list still counts in the macro average when num_labels says so.
    assert compute_metrics("classification", [0, 1], [0, 1], num_labels=3)["f1"] == pytest.approx(2 / 3)


def test_binary_f1_is_that_of_class_one():
    m = compute_metrics("classification", [0, 0, 0, 1], [0, 0, 1, 1], num_labels=2)
    assert m["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # class 1: precision 1, recall 1/2


def test_regression_correlations_by_hand():
    # dx = (-1, 0, 1), dy = (-1, 1, 0): r = 1 / sqrt(2 * 2) = 1/2; ranks equal the values.
    m = compute_metrics("regression", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert m == {"pearson": pytest.approx(0.5), "spearman": pytest.approx(0.5)}
    assert compute_metrics("regression", [2.0, 2.0, 2.0], [1.0, 3.0, 2.0]) == {
        "pearson": 0.0,
        "spearman": 0.0,
    }


def test_generation_metrics_by_hand():
    same = compute_metrics("generation", ["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"bleu": pytest.approx(100.0), "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    # All n-gram precisions are 1 (5 tokens against 6): BLEU = brevity penalty exp(1 - 6/5).
    short = compute_metrics("generation", ["the cat sat on the"], ["the cat sat on the mat"])
    assert short["bleu"] == pytest.approx(100 * math.exp(1 - 6 / 5), abs=1e-3)
    # ROUGE-1: P 3/3, R 3/6 -> 2/3; ROUGE-2: P 2/2, R 2/5 -> 4/7; ROUGE-L: LCS 3 -> 2/3.
    part = compute_metrics("generation", ["the cat sat"], ["the cat sat on the mat"])
    assert part["rouge1"] == pytest.approx(2 / 3)
    assert part["rouge2"] == pytest.approx(4 / 7)
    assert part["rougeL"] == pytest.approx(2 / 3)
    # Porter stemming: cats -> cat, running / runs -> run.
    assert compute_metrics("generation", ["cats running"], ["cat runs"])["rouge1"] == pytest.approx(1.0)


def test_metric_errors():
    with pytest.raises(SensloraError, match="unknown problem"):
        compute_metrics("ranking", [1], [1])
    with pytest.raises(SensloraError, match="empty"):
        compute_metrics("classification", [], [])
    with pytest.raises(ValueError):
        compute_metrics("classification", [1, 0], [1])


def _task(problem, examples, num_labels):
    return TaskData(
        name="t",
        problem=problem,
        num_labels=num_labels,
        train=[],
        validation=[],
        test=list(examples),
        metrics=PROBLEM_METRICS[problem],
        primary_metric="x",
        splits_seed=0,
    )


TEXTS = [
    "the film is good",
    "the film is very bad",
    "a great film",
    "awful",
    "not good at all",
    "one two three",
]


@pytest.mark.parametrize("problem", ["classification", "regression"])
def test_evaluate_model_matches_a_manual_forward_pass(word_tokenizer, problem):
    tok = word_tokenizer()
    if problem == "classification":
        model = tiny_bert(num_labels=2)
        examples = [Example(text=t, label=i % 2, id=str(i)) for i, t in enumerate(TEXTS)]
    else:
        model = tiny_bert(num_labels=1, problem_type="regression")
        examples = [Example(text=t, label=float(i) / 2, id=str(i)) for i, t in enumerate(TEXTS)]
    task = _task(problem, examples, 2 if problem == "classification" else 1)
    model.train()
    metrics = evaluate_model(model, tok, examples, task, batch_size=4, max_length=16, device="cpu")
    assert model.training  # mode restored
    assert set(metrics) == set(task.metrics)

    model.eval()
    preds, losses = [], []
    with torch.no_grad():
        for batch in make_batches(examples, tok, kind=problem, max_length=16, batch_size=4):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if problem == "classification":
                preds += logits.argmax(-1).tolist()
                losses += F.cross_entropy(logits, batch["labels"], reduction="none").tolist()
            else:
                preds += logits.squeeze(-1).tolist()
                losses += ((logits.squeeze(-1) - batch["labels"]) ** 2).tolist()
    expected = compute_metrics(problem, preds, [ex.label for ex in examples], num_labels=task.num_labels)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value)
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / len(losses))
    again = evaluate_model(model, tok, examples, task, batch_size=4, max_length=16, device="cpu")
    assert again == metrics


def test_generation_eval_loss_and_batched_greedy_answers(word_tokenizer):
    tok = word_tokenizer()
    tok.pad_token = tok.eos_token
    model = tiny_llama()
    prompts = ["what is one", "what is the film", "hello", "why is the film very good"]
    answers = ["two", "good", "hello world", "great"]
    examples = [
        Example(text=f"{p}\n{a}", prompt=p, answer=a, id=str(i))
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    task = _task("generation", examples, 0)
    metrics = evaluate_model(
        model, tok, examples, task, batch_size=4, max_length=32, max_new_tokens=5, device="cpu"
    )

    batch = make_batches(examples, tok, kind="causal-lm", max_length=32, batch_size=4)[0]
    with torch.no_grad():
        expected_loss = per_example_loss(model, batch).mean().item()
    assert metrics["eval_loss"] == pytest.approx(expected_loss)

    # Left padding in a batch gives the same greedy answers as one prompt at a time.
    batched = generate_answers(
        model, tok, prompts, batch_size=4, max_length=32, max_new_tokens=5, device="cpu"
    )
    single = [
        generate_answers(model, tok, [p], batch_size=1, max_length=32, max_new_tokens=5, device="cpu")[0]
        for p in prompts
    ]
    assert batched == single
    expected = compute_metrics("generation", batched, answers)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)


def test_evaluating_nothing_is_a_user_error(word_tokenizer):
    with pytest.raises(SensloraError, match="nothing to evaluate"):
        evaluate_model(tiny_bert(), word_tokenizer(), [], _task("classification", [], 2))
