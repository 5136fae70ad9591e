"""Data loading: aliases (VADER fetched by `senslora fetch` into the shared cache, chatterbot), user files, batches."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from senslora.core.errors import SensloraError
from senslora.data import corpora
from senslora.data.examples import (
    CALIB_ALIASES,
    Example,
    bos_prefix,
    chat_pairs,
    load_examples,
    make_batches,
    pad_rows,
    padding_id,
    prompt_text,
    sample_examples,
    vader_records,
)

TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


# ------------------------------------------------------------------------------------ aliases
def test_vader_counts():
    """Uses the shared default cache, filled by scripts/setup.sh (`senslora fetch`)."""
    movie = vader_records("movieReviewSnippets")
    scores = [s for _, s, _ in movie]
    assert len(movie) == 10605
    signs = Counter((s > 0) - (s < 0) for s in scores)
    assert (signs[1], signs[-1], signs[0]) == (5242, 5326, 37)
    assert all(-4 <= s <= 4 for s in scores)
    assert len({i for i, _, _ in movie}) == len(movie)
    assert movie[0][2].startswith("The Rock is destined")
    assert not any("\r" in t or "\t" in t for _, _, t in movie)
    assert len(vader_records("tweets")) == 4200
    with pytest.raises(SensloraError, match="unknown VADER set"):
        vader_records("imdb")


@pytest.mark.parametrize(("alias", "n", "pos"), [("movie", 10568, 5242), ("tweets", 4196, 2897)])
def test_sentiment_alias_label_rule(alias, n, pos):
    examples = load_examples(alias)
    assert len(examples) == n
    assert Counter(ex.label for ex in examples) == {1: pos, 0: n - pos}
    by_id = {
        rid: score for rid, score, _ in vader_records("movieReviewSnippets" if alias == "movie" else "tweets")
    }
    for ex in examples[:200]:
        score = by_id[ex.id.split(":", 1)[1]]
        assert score != 0 and ex.label == int(score > 0)


def test_score_alias_is_regression():
    examples = load_examples("movie-score")
    assert len(examples) == 10605
    assert all(isinstance(ex.label, float) for ex in examples)


def test_chat_pairs():
    pairs = chat_pairs()
    assert len(pairs) == 2306
    assert all(isinstance(q, str) and isinstance(a, str) and q and a for q, a in pairs)
    assert pairs[0] == (
        "What is AI?",
        "Artificial Intelligence is the branch of engineering and science devoted to constructing machines that think.",
    )
    examples = load_examples("chat")
    assert len(examples) == len(pairs) and len({ex.id for ex in examples}) == len(examples)
    ex = examples[0]
    assert ex.text == f"{ex.prompt}\n{ex.answer}" and ex.label is None
    assert chat_pairs() == pairs  # deterministic


def test_aliases_listed():
    assert {"movie", "tweets", "chat"} <= set(CALIB_ALIASES)


def _never_run(cmd, **kwargs):
    pytest.fail(f"ran {cmd}")


def test_vader_missing_is_one_line_and_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setenv("SENSLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora.subprocess, "run", _never_run)
    with pytest.raises(SensloraError, match=r"VADER data in .* is missing; run `senslora fetch` \(or scripts/setup.sh\)"):
        vader_records("tweets")
    assert list(tmp_path.iterdir()) == []


def test_fetch_download_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("SENSLORA_CACHE", str(tmp_path))

    def fail(cmd, **kwargs):
        assert "download" in cmd and "vaderSentiment==3.3.2" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for vaderSentiment\n"
        )

    monkeypatch.setattr(corpora.subprocess, "run", fail)
    with pytest.raises(SensloraError, match="No matching distribution.*get it by hand.*senslora fetch --from"):
        corpora.fetch_vader()
    assert list(tmp_path.rglob("*_GroundTruth.txt")) == []


def _fake_sdist(path: Path) -> Path:
    """A tarball laid out like vaderSentiment's sdist, two rows per ground-truth file."""
    import io
    import tarfile

    def add(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for name in corpora.VADER_SETS:
            add(tar, f"hutto_ICWSM_2014/{name}_GroundTruth.txt", b"1\t0.5\tnice\r\n2\t-1.5\tbad\r\n")
    with tarfile.open(path, "w:gz") as tar:
        add(tar, corpora._VADER_INNER, inner.getvalue())
    return path


def test_fetch_from_a_tarball_checks_its_hash(monkeypatch, tmp_path, capsys):
    from senslora.cli.main import main
    from senslora.core.cache import sha256_file

    monkeypatch.setenv("SENSLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpora.subprocess, "run", _never_run)
    sdist = _fake_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz")
    assert main(["fetch", "--from", str(sdist)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"has SHA-256 {sha256_file(sdist)}, not that of" in err[0]
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(corpora, "VADER_SDIST_SHA256", sha256_file(sdist))
    monkeypatch.setitem(corpora.VADER_SETS, "tweets", 2)
    assert main(["fetch", "--from", str(sdist)]) == 0
    assert capsys.readouterr().out.strip() == f"VADER data ready in {corpora.vader_dir()}"
    assert vader_records("tweets") == [("1", 0.5, "nice"), ("2", -1.5, "bad")]
    assert main(["fetch"]) == 0  # there and intact: nothing to do (no pip)
    assert sdist.is_file()


def test_vader_hand_copied_and_damaged(monkeypatch, tmp_path):
    monkeypatch.setenv("SENSLORA_CACHE", str(tmp_path))
    folder = tmp_path / "data" / "vader"
    folder.mkdir(parents=True)
    for name in corpora.VADER_SETS:
        (folder / f"{name}_GroundTruth.txt").write_text("1\t0.5\tnice\r\n2\t-1\tbad\r\n", encoding="utf-8")
    monkeypatch.setattr(corpora.subprocess, "run", _never_run)
    with pytest.raises(SensloraError, match="has 2 rows, expected 4200"):
        vader_records("tweets")


# ---------------------------------------------------------------------------------- user files
def test_txt(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("first line\r\n\r\n  second  \n\nthird é\n".encode())
    examples = load_examples(path)
    assert [ex.text for ex in examples] == ["first line", "second", "third é"]
    assert all(ex.label is None for ex in examples)


def test_csv_and_tsv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('sentence,other,label\n"a, quoted ""film""",x,1\nbad film,y,0\n', encoding="utf-8")
    examples = load_examples(path, text_column="sentence", label_column="label")
    assert [(ex.text, ex.label) for ex in examples] == [('a, quoted "film"', 1), ("bad film", 0)]
    pairs = load_examples(path, text_column="sentence", text_pair_column="other")
    assert pairs[1].text_pair == "y" and pairs[1].label is None
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tscore\ngood\t3.5\nbad\t-1\n", encoding="utf-8")
    assert [ex.label for ex in load_examples(tsv, label_column="score")] == [3.5, -1]


def test_missing_column_lists_present(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\nfine,1\n", encoding="utf-8")
    with pytest.raises(SensloraError, match=r"cannot tell the data format .*columns present: 'sentence', 'label'"):
        load_examples(path)
    with pytest.raises(SensloraError, match=r"no text column 'txt'; columns present: 'sentence', 'label'"):
        load_examples(path, text_column="txt")  # a column named: the text format
    with pytest.raises(SensloraError, match=r"no label column 'y'"):
        load_examples(path, text_column="sentence", label_column="y")


@pytest.mark.parametrize(
    "content",
    ['text,label\n"unterminated,1\n', "text,label\ngood,1,extra\n", "text,label\ngood\n"],
)
def test_malformed_csv(tmp_path, content):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SensloraError, match="bad.csv"):
        load_examples(path, label_column="label")


def test_bad_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,positive\n", encoding="utf-8")
    with pytest.raises(SensloraError, match="not a number"):
        load_examples(path, label_column="label")
    path.write_text("text,label\ngood,\n", encoding="utf-8")
    with pytest.raises(SensloraError, match="empty"):
        load_examples(path, label_column="label")


@pytest.mark.parametrize(
    ("name", "content"), [("e.txt", "\n \n"), ("e.csv", "text,label\n"), ("e.jsonl", "\n")]
)
def test_empty(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SensloraError, match="is empty"):
        load_examples(path)


def test_jsonl_and_json(tmp_path):
    rows = [{"q": "why?", "a": "because.", "y": True}, {"q": "what?", "a": "that.", "y": 0}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    examples = load_examples(path, prompt_column="q", answer_column="a", label_column="y")
    assert [(ex.prompt, ex.answer, ex.label) for ex in examples] == [
        ("why?", "because.", 1),
        ("what?", "that.", 0),
    ]
    assert examples[0].text == "why?\nbecause."
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"text": "one"}, {"text": "two"}]), encoding="utf-8")
    assert [ex.text for ex in load_examples(array)] == ["one", "two"]
    with pytest.raises(SensloraError, match="both a prompt column and an answer column"):
        load_examples(path, prompt_column="q")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"t": 1}', "columns present: 't'"),
    ],
)
def test_bad_json(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SensloraError, match=match):
        load_examples(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SensloraError, match="not UTF-8"):
        load_examples(path)


def test_save_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]})
    ds.save_to_disk(str(tmp_path / "single"))
    examples = load_examples(tmp_path / "single", text_column="sentence", label_column="label")
    assert [(ex.text, ex.label) for ex in examples] == [("good", 1), ("bad", 0), ("fine", 1)]
    DatasetDict({"validation": ds.select([0]), "train": ds.select([1, 2])}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert [ex.text for ex in load_examples(tmp_path / "dict", text_column="sentence")] == ["bad", "fine"]
    DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(SensloraError, match="splits present: a, b"):
        load_examples(tmp_path / "nosplit", text_column="sentence")
    with pytest.raises(SensloraError, match="columns present: 'sentence', 'label'"):
        load_examples(tmp_path / "single")
    (tmp_path / "plain").mkdir()
    with pytest.raises(SensloraError, match="not a data set saved"):
        load_examples(tmp_path / "plain")


def test_hub_spec(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "offline":
            raise ConnectionError("Couldn't reach the Hub")
        return datasets.Dataset.from_dict({"sentence": ["x"], "label": [1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples = load_examples("hf:glue:sst2:validation", text_column="sentence", label_column="label")
    assert examples == [Example(text="x", label=1, id="0")]
    load_examples("hf:imdb", text_column="sentence")
    assert calls == [("glue", "sst2", "validation"), ("imdb", None, "train")]
    with pytest.raises(SensloraError, match="ConnectionError.*network"):
        load_examples("hf:offline")
    with pytest.raises(SensloraError, match="hf:NAME"):
        load_examples("hf:")


def test_unknown_spec(tmp_path):
    with pytest.raises(SensloraError, match="neither a known alias"):
        load_examples(tmp_path / "missing.csv")
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    with pytest.raises(SensloraError, match="unsupported data file type"):
        load_examples(tmp_path / "d.xlsx")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
def test_calibration_sets_and_tasks_read_files_alike(tmp_path, suffix):
    # One reader (senslora.data.readers) behind both: same rows, same ids, same parse errors.
    from senslora.data.tasks import load_task

    rows = [{"text": f"t {i}", "label": f"{i / 4:g}"} for i in range(20)]
    path = tmp_path / f"d{suffix}"
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        path.write_text("text" + sep + "label\n" + "".join(f"{r['text']}{sep}{r['label']}\n" for r in rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    examples = load_examples(path, label_column="label")
    task = load_task(f"{'csv' if suffix in ('.csv', '.tsv') else 'jsonl'}:{path}", problem="regression")
    in_task = {ex.id: (ex.text, ex.label) for ex in task.train + task.validation + task.test}
    assert in_task == {ex.id: (ex.text, float(ex.label)) for ex in examples}
    assert len(in_task) == len(rows)
    if suffix in (".csv", ".tsv"):
        path.write_text(path.read_text() + "extra" + sep + "1" + sep + "2\n")
        kind = suffix[1:].upper()
        message = f"does not parse as {kind}: data row 21 has 3 fields, the header 2"
        with pytest.raises(SensloraError, match=message):
            load_examples(path, label_column="label")
        with pytest.raises(SensloraError, match=message):
            load_task(f"csv:{path}")


# --------------------------------------------------------------------------------- sampling
def test_sample_examples():
    examples = [Example(text=str(i), id=str(i)) for i in range(50)]
    a = sample_examples(examples, 10, seed=1)
    assert a == sample_examples(examples, 10, seed=1)
    assert len(a) == 10 and len({ex.id for ex in a}) == 10
    assert a != sample_examples(examples, 10, seed=2)
    assert sample_examples(examples, None, seed=1) == examples
    assert sample_examples(examples, 50, seed=1) == examples
    with pytest.raises(SensloraError):
        sample_examples(examples, 0, seed=1)


# ---------------------------------------------------------------------------------- batches
def test_classification_batches(word_tokenizer):
    tok = word_tokenizer()
    tok.pad_token = tok.eos_token
    examples = [
        Example("the film is good", label=1),
        Example("bad", label=0.0),
        Example("a great film", label=1),
    ]
    batches = make_batches(examples, tok, kind="classification", batch_size=2)
    assert len(batches) == 2
    first = batches[0]
    assert first["labels"].dtype == torch.long and first["labels"].tolist() == [1, 0]
    assert first["input_ids"].shape == (2, 5)  # <s> + 4 words, padded to the longest
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert first["input_ids"][1, 2:].tolist() == [tok.pad_token_id] * 3  # right padding
    reg = make_batches(examples, tok, kind="regression", batch_size=8)[0]
    assert reg["labels"].dtype == torch.float32 and reg["labels"].tolist() == [1.0, 0.0, 1.0]
    unlabelled = make_batches([Example("good"), Example("bad")], tok, kind="classification")
    assert "labels" not in unlabelled[0]


def test_pad_rows_and_padding_id(word_tokenizer):
    ids, mask = pad_rows([[1, 2, 3], [4], []], 0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    left, left_mask = pad_rows([[1, 2, 3], [4]], 9, left=True, width=4)  # as generation pads
    assert left.tolist() == [[9, 1, 2, 3], [9, 9, 9, 4]]
    assert left_mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert pad_rows([], 0)[0].shape == (0, 0)
    tok = word_tokenizer()
    assert tok.pad_token is None and padding_id(tok) == tok.eos_token_id  # no pad token: EOS
    tok.pad_token = "[UNK]"
    assert padding_id(tok) == tok.convert_tokens_to_ids("[UNK]")
    assert make_batches([Example("the film"), Example("bad")], tok, kind="base")[0]["input_ids"][1, -1] == (
        padding_id(tok)
    )


def test_batch_errors(word_tokenizer):
    tok = word_tokenizer()
    with pytest.raises(SensloraError, match="1 of 2 examples have no label"):
        make_batches([Example("good", label=1), Example("bad")], tok, kind="classification")
    with pytest.raises(SensloraError, match="integers >= 0"):
        make_batches([Example("good", label=0.5)], tok, kind="classification")
    with pytest.raises(SensloraError, match="validation split"):
        make_batches([Example("good", label=-1)], tok, kind="classification")
    with pytest.raises(SensloraError, match="max_length"):
        make_batches([Example("good")], tok, kind="classification", max_length=7)
    with pytest.raises(SensloraError, match="batch kind"):
        make_batches([Example("good")], tok, kind="seq2seq")


def test_minilm_tokenizer_pairs_truncation():
    from transformers import AutoTokenizer

    from senslora.data.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"), local_files_only=True)
    long_text = " ".join(["film"] * 100)
    examples = [
        Example(long_text, text_pair="a good one", label=1),
        Example("short", text_pair="pair", label=0),
    ]
    batch = make_batches(examples, tok, kind="classification", max_length=16)[0]
    assert batch["input_ids"].shape == (2, 16)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["token_type_ids"][1].tolist()[:6] == [0, 0, 0, 1, 1, 0]  # [CLS] short [SEP] pair [SEP] pad
    assert batch["input_ids"][0, -1].item() == tok.sep_token_id


def test_causal_plain_text(word_tokenizer):
    tok = word_tokenizer()
    tok.pad_token = tok.eos_token
    examples = [Example("the film is good"), Example("bad")]
    batch = make_batches(examples, tok, kind="causal-lm")[0]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    words = tok("the film is good", add_special_tokens=False).input_ids
    assert batch["input_ids"][0].tolist() == [bos, *words, eos]
    assert batch["labels"][1].tolist() == [bos, tok.convert_tokens_to_ids("bad"), eos, -100, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    truncated = make_batches([Example(" ".join(["one"] * 30))], tok, kind="causal-lm", max_length=10)[0]
    assert truncated["input_ids"].shape == (1, 10)


def test_causal_prompt_answer_plain(word_tokenizer):
    tok = word_tokenizer()
    ex = Example("what ?\nhello world", prompt="what ?", answer="hello world")
    assert prompt_text(tok, "what ?") == "what ?\n"
    assert bos_prefix(tok) == [tok.bos_token_id]
    other = Example("bad")
    batch = make_batches([ex, other], tok, kind="causal-lm")[0]
    ids = batch["input_ids"][0].tolist()
    words = tok("what ? hello world", add_special_tokens=False).input_ids
    assert ids == [tok.bos_token_id, *words, tok.eos_token_id]
    labels = batch["labels"][0].tolist()
    assert labels[:3] == [-100] * 3 and labels[3:] == ids[3:]  # loss on "hello world </s>" only
    assert batch["labels"][1].tolist()[3:] == [-100] * 3  # padding of the shorter row


def test_causal_prompt_answer_chat_template(word_tokenizer):
    tok = word_tokenizer(bos=False, chat_template=TEMPLATE)
    ex = Example("", prompt="what ?", answer="hello world")
    assert prompt_text(tok, "what ?") == "<s> user what ? </s> <s> assistant "
    batch = make_batches([ex], tok, kind="causal-lm")[0]
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert tok.decode(ids).split() == "<s> user what ? </s> <s> assistant hello world </s>".split()
    n_prompt = 7
    assert labels[:n_prompt] == [-100] * n_prompt
    assert tok.convert_ids_to_tokens(labels[n_prompt:]) == ["hello", "world", "</s>"]  # no doubled EOS


def test_causal_truncation_keeps_prompt_end_and_answer(word_tokenizer):
    tok = word_tokenizer()
    ex = Example("", prompt=" ".join(["one"] * 20) + " what ?", answer=" ".join(["two"] * 20))
    batch = make_batches([ex], tok, kind="causal-lm", max_length=16)[0]
    tokens = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    labels = batch["labels"][0].tolist()
    assert len(tokens) == 16
    assert tokens[:8][-2:] == ["what", "?"]  # the prompt's end survives
    assert tokens[8:] == ["two"] * 8 and labels[:8] == [-100] * 8  # answer keeps max_length // 2


def test_batches_deterministic(word_tokenizer):
    tok = word_tokenizer()
    examples = [Example("the film is good", label=1), Example("bad", label=0)] * 5
    a = make_batches(examples, tok, kind="classification", batch_size=3)
    b = make_batches(examples, tok, kind="classification", batch_size=3)
    assert len(a) == 4 and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_real_chat_batches():
    """The real chat alias through a real tokenizer (MiniLM's; no chat template) stays well formed."""
    from transformers import AutoTokenizer

    from senslora.data.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"), local_files_only=True)
    examples = load_examples("chat")[:16]
    for batch in make_batches(examples, tok, kind="causal-lm", max_length=32, batch_size=8):
        assert batch["input_ids"].shape[1] <= 32
        supervised = (batch["labels"] != -100).sum(dim=1)
        assert (supervised > 0).all()
        assert ((batch["labels"] != -100) <= (batch["attention_mask"] == 1)).all()
