import csv
import json

import pytest

from senslora.core.errors import SensloraError
from senslora.data.examples import vader_dir
from senslora.data.tasks import TASKS, load_task, split_80_10_10


def _write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def labelled_csv(tmp_path):
    rows = [(f"text {i}", "pos" if i % 3 else "neg") for i in range(50)]
    return _write_csv(tmp_path / "data.csv", rows)


def _ids(examples):
    return [ex.id for ex in examples]


def test_csv_task_splits_80_10_10_seeded_and_disjoint(labelled_csv):
    task = load_task(f"csv:{labelled_csv}")
    assert (len(task.train), len(task.validation), len(task.test)) == (40, 5, 5)
    all_ids = _ids(task.train) + _ids(task.validation) + _ids(task.test)
    assert sorted(all_ids, key=int) == [str(i) for i in range(50)]
    again = load_task(f"csv:{labelled_csv}")
    assert task.split_ids() == again.split_ids()
    other = load_task(f"csv:{labelled_csv}", split_seed=1)
    assert _ids(other.test) != _ids(task.test)
    assert task.problem == "classification" and task.num_labels == 2 and task.splits_seed == 0
    assert task.metrics == ("accuracy", "f1", "matthews", "eval_loss") and task.primary_metric == "accuracy"
    assert task.model_kind == "classification"


def test_string_labels_map_sorted_and_integer_labels_numerically(tmp_path, labelled_csv):
    task = load_task(f"csv:{labelled_csv}")
    assert task.label_names == ["neg", "pos"]
    for ex in task.train + task.test:
        assert ex.label == (1 if int(ex.id) % 3 else 0)
    # Integers sort numerically (10 after 2), and map to 0..C-1.
    rows = [(f"t{i}", [2, 10, 5][i % 3]) for i in range(30)]
    task = load_task(f"csv:{_write_csv(tmp_path / 'ints.csv', rows)}")
    assert task.label_names == ["2", "5", "10"]
    assert {ex.id: ex.label for ex in task.train}["1"] == 2  # label 10 -> index 2


def test_problem_inference_regression_and_generation(tmp_path):
    rows = [(f"t{i}", i / 7) for i in range(20)]
    task = load_task(f"csv:{_write_csv(tmp_path / 'reg.csv', rows)}")
    assert task.problem == "regression" and task.num_labels == 1
    assert task.metrics == ("pearson", "spearman", "eval_loss")
    assert all(isinstance(ex.label, float) for ex in task.train)

    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(20)))
    task = load_task(f"jsonl:{path}", text_column="q", label_column="a", problem="generation")
    assert task.model_kind == "causal-lm" and task.primary_metric == "rougeL"
    ex = task.test[0]
    assert ex.prompt == f"question {ex.id}" and ex.answer == f"answer {ex.id}" and ex.label is None


def test_text_pairs_and_truncation(tmp_path):
    rows = [(f"a{i}", f"b{i}", i % 2) for i in range(30)]
    path = _write_csv(tmp_path / "pairs.csv", rows, header=("s1", "s2", "y"))
    task = load_task(
        f"csv:{path}",
        text_column="s1",
        text_pair_column="s2",
        label_column="y",
        max_train_samples=5,
        max_eval_samples=2,
    )
    assert (len(task.train), len(task.validation), len(task.test)) == (5, 2, 2)
    assert task.train[0].text_pair == "b" + task.train[0].text[1:]
    full = load_task(f"csv:{path}", text_column="s1", text_pair_column="s2", label_column="y")
    assert _ids(task.train) == _ids(full.train)[:5]


@pytest.mark.parametrize(
    "content, match",
    [
        ('text,label\n"unterminated,1\n', "does not parse as CSV"),
        ("text,label\na,1,extra\n", "does not parse as CSV"),
        ("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(9)), "at least 10"),
        (
            "text,target\n" + "".join(f"t{i},{i % 2}\n" for i in range(20)),
            "no label column 'label'; columns present: 'text', 'target'",
        ),
        ("text,label\n" + "".join(f"t{i},1\n" for i in range(20)), "single class"),
        ("text,label\n" + "".join(f"t{i},{'' if i == 3 else 1}\n" for i in range(20)), "row 4 has no label"),
    ],
)
def test_bad_csv_is_a_user_error(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(SensloraError, match=match):
        load_task(f"csv:{path}")


def test_bad_specs_are_user_errors(tmp_path, labelled_csv):
    with pytest.raises(SensloraError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(SensloraError, match="write csv:"):
        load_task(str(labelled_csv))
    with pytest.raises(SensloraError, match="does not exist"):
        load_task(f"csv:{tmp_path / 'missing.csv'}")
    with pytest.raises(SensloraError, match="unknown GLUE task"):
        load_task("glue:nope")
    with pytest.raises(SensloraError, match="unknown problem"):
        load_task(f"csv:{labelled_csv}", problem="ranking")
    path = tmp_path / "reg.csv"
    _write_csv(path, [(f"t{i}", "x" if i == 5 else i / 3) for i in range(20)])
    with pytest.raises(SensloraError, match="regression needs finite numbers"):
        load_task(f"csv:{path}", problem="regression")


def _save_disk(path, splits):
    from datasets import Dataset, DatasetDict

    DatasetDict({name: Dataset.from_dict(cols) for name, cols in splits.items()}).save_to_disk(str(path))
    return path


def _cols(n, label, prefix="t"):
    return {"text": [f"{prefix}{i}" for i in range(n)], "label": [label(i) for i in range(n)]}


def test_disk_keeps_its_splits_and_checks_classes(tmp_path):
    full = _save_disk(
        tmp_path / "full",
        {
            "train": _cols(20, lambda i: i % 2),
            "validation": _cols(4, lambda i: i % 2, "v"),
            "test": _cols(6, lambda i: 1, "x"),
        },
    )
    task = load_task(f"disk:{full}")
    assert (len(task.train), len(task.validation), len(task.test)) == (20, 4, 6)
    assert task.test[0].id == "test:0" and task.test[0].text == "x0"

    # GLUE-style: the test labels are hidden (-1): test <- validation, validation carved from train.
    hidden = _save_disk(
        tmp_path / "hidden",
        {
            "train": _cols(30, lambda i: i % 2),
            "validation": _cols(4, lambda i: i % 2, "v"),
            "test": _cols(5, lambda i: -1, "x"),
        },
    )
    task = load_task(f"disk:{hidden}")
    assert [ex.text for ex in task.test] == ["v0", "v1", "v2", "v3"]
    assert (len(task.train), len(task.validation)) == (27, 3)

    outside = _save_disk(
        tmp_path / "outside",
        {"train": _cols(20, lambda i: i % 2), "test": _cols(4, lambda i: 2 if i == 1 else 0, "x")},
    )
    with pytest.raises(SensloraError, match=r"test split .* label 2, which is not one of the task's classes"):
        load_task(f"disk:{outside}")
    small = _save_disk(
        tmp_path / "small", {"train": _cols(9, lambda i: i % 2), "test": _cols(3, lambda i: i % 2)}
    )
    with pytest.raises(SensloraError, match="carving a validation split needs at least 10"):
        load_task(f"disk:{small}")


vader_cached = pytest.mark.skipif(
    not all((vader_dir() / f"{n}_GroundTruth.txt").is_file() for n in ("movieReviewSnippets", "tweets")),
    reason="VADER data not cached (it is fetched from PyPI on first use)",
)


@vader_cached
def test_builtin_vader_tasks():
    task = load_task("movie-polarity")
    assert len(task.train) + len(task.validation) + len(task.test) == 10605 - 37  # score-0 rows dropped
    assert len(task.test) == 1056 and task.num_labels == 2 and task.label_names == ["0", "1"]
    assert {ex.label for ex in task.test} == {0, 1}
    score = load_task("movie-score", max_train_samples=10)
    assert score.problem == "regression" and len(score.train) == 10 and len(score.test) == 1060
    assert all(-4 <= ex.label <= 4 for ex in score.test)
    tweets = load_task("tweet-polarity", max_eval_samples=3)
    assert tweets.problem == "classification" and len(tweets.test) == 3
    with pytest.raises(SensloraError, match="is a classification task"):
        load_task("movie-polarity", problem="regression")


def test_builtin_chat_task():
    task = load_task("chat-qa")
    assert set(TASKS) == {"movie-polarity", "movie-score", "tweet-polarity", "chat-qa"}
    assert task.problem == "generation" and task.model_kind == "causal-lm"
    assert len(task.train) + len(task.validation) + len(task.test) == 2306
    assert all(ex.prompt and ex.answer for ex in task.test)


def test_split_is_independent_of_order_of_calls():
    from senslora.data.examples import Example

    examples = [Example(text=str(i), id=str(i)) for i in range(100)]
    first = split_80_10_10(examples, 3, "x")
    split_80_10_10(examples, 4, "x")
    assert split_80_10_10(examples, 3, "x") == first
