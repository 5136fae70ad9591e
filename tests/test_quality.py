"""TsqLoRA-style data quality: dedupe, per-example scores, IFD, the selection rules, the record."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_bert, tiny_llama

from senslora.core.errors import SensloraError
from senslora.core.losses import per_example_loss
from senslora.data.examples import Example, make_batches
from senslora.training.quality import (
    QualitySelection,
    dedupe,
    normalise_text,
    score_examples,
    select_by_quality,
    select_training_data,
)

WORDS = (
    "hello world what is your name my the a cat dog sat on mat good bad movie film was great awful "
    "i like it not do you how are fine thanks who am tell me joke why sky blue because light yes no"
).split()


def tokenizer(bos: bool = True):  # not the conftest fixture: a bigger vocabulary
    """A word-level fast tokenizer built in code (no downloads); ids fit tiny models' vocab of 100."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        bos_token="[BOS]" if bos else None,
    )


def gen(prompt: str, answer: str, ex_id: str = "") -> Example:
    return Example(text=f"{prompt}\n{answer}", prompt=prompt, answer=answer, id=ex_id)


# --------------------------------------------------------------------------------- dedupe
def test_normalise_text():
    assert normalise_text("Hello, world!") == "hello world"
    assert normalise_text("  HELLO\t\n world ") == "hello world"
    assert normalise_text("Straße") == normalise_text("STRASSE")


def test_dedupe_drops_empty_exact_and_near_duplicates():
    exs = [
        Example(text="Hello, world!"),
        Example(text="hello world"),
        Example(text="   "),
        Example(text="Hello, world!"),
        Example(text="something else"),
        Example(text=":)"),
        Example(text=":("),
    ]
    kept, dropped = dedupe(exs)
    assert [e.text for e in kept] == ["Hello, world!", "something else", ":)", ":("]
    assert [e.id for e in kept] == ["#0", "#4", "#5", "#6"]  # missing ids are filled in
    assert dropped == [
        {"id": "#1", "reason": "near-duplicate of #0"},
        {"id": "#2", "reason": "empty text"},
        {"id": "#3", "reason": "duplicate of #0"},
    ]


def test_dedupe_generation_and_pairs():
    exs = [
        gen("what is your name", "my name is cat", "a"),
        gen("What is your name?", "My name is cat.", "b"),  # near duplicate of a
        gen("what is your name", "my name is dog", "c"),  # same prompt, other answer: kept
        gen("tell me a joke", "", "d"),  # empty answer
        Example(text="good movie", text_pair="yes", id="e"),
        Example(text="good movie", text_pair="no", id="f"),  # other pair: kept
        Example(text="good", text_pair="movie yes", id="g"),  # same words, other split: kept
    ]
    kept, dropped = dedupe(exs)
    assert [e.id for e in kept] == ["a", "c", "e", "f", "g"]
    assert dropped == [
        {"id": "b", "reason": "near-duplicate of a"},
        {"id": "d", "reason": "empty prompt or answer"},
    ]


def test_dedupe_rejects_repeated_ids():
    with pytest.raises(SensloraError, match="more than once"):
        dedupe([Example(text="a", id="x"), Example(text="b", id="x")])


# -------------------------------------------------------------------------------- scoring
def test_classification_scores_match_per_example_loss():
    model, tok = tiny_bert(), tokenizer()
    exs = [
        Example(text=t, label=i % 2, id=str(i))
        for i, t in enumerate(["good movie", "the film was awful", "i like it", "not good", "bad"])
    ]
    scores = score_examples(
        model, tok, exs, kind="classification", max_length=16, batch_size=3, progress=False
    )
    assert [s["id"] for s in scores] == ["0", "1", "2", "3", "4"]
    for ex, s in zip(exs, scores, strict=True):
        with torch.no_grad():
            ref = per_example_loss(
                model, make_batches([ex], tok, kind="classification", max_length=16, batch_size=1)[0]
            )
        assert s["loss"] == pytest.approx(float(ref[0]), abs=1e-5)
        assert "ifd" not in s


def test_regression_scores():
    model, tok = tiny_bert(num_labels=1, problem_type="regression"), tokenizer()
    exs = [Example(text="good movie", label=2.5), Example(text="bad film", label=-1.0)]
    scores = score_examples(model, tok, exs, kind="regression", max_length=16, batch_size=2, progress=False)
    with torch.no_grad():
        pred = model(
            **{
                k: v
                for k, v in make_batches(exs, tok, kind="regression", batch_size=2)[0].items()
                if k != "labels"
            }
        ).logits
    expect = (pred.squeeze(-1) - torch.tensor([2.5, -1.0])).square()
    assert [s["loss"] for s in scores] == pytest.approx(expect.tolist(), abs=1e-5)


def _manual_answer_loss(model, tok, answer: str) -> float:
    # [BOS] + answer + [EOS]; mean next-token cross-entropy over the answer and EOS tokens.
    ids = [tok.bos_token_id] + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0]
    return float(F.cross_entropy(logits[:-1], x[0, 1:]))


def _manual_conditioned_loss(model, tok, prompt: str, answer: str) -> float:
    p = [tok.bos_token_id] + tok(prompt + "\n", add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    x = torch.tensor([p + a])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0]
    return float(F.cross_entropy(logits[len(p) - 1 : -1], x[0, len(p) :]))


@pytest.mark.parametrize("bos", [True, False])
def test_ifd_on_tiny_llama(bos):
    model, tok = tiny_llama(), tokenizer(bos=bos)
    exs = [
        gen("what is your name", "my name is cat", "a"),
        gen("how are you", "fine thanks", "b"),
        Example(text="the cat sat on the mat", id="plain"),  # plain LM text: loss, no IFD
        gen("why is the sky blue", "because light", "c"),
    ]
    scores = score_examples(model, tok, exs, kind="causal-lm", max_length=32, batch_size=3, progress=False)
    assert [s["id"] for s in scores] == ["a", "b", "plain", "c"]
    assert "ifd" not in scores[2] and scores[2]["loss"] > 0
    for ex, s in zip(exs, scores, strict=True):
        if ex.prompt is None:
            continue
        assert s["tokens"] == len(ex.answer.split()) + 1  # answer words + EOS
        if bos:  # independent reference with hand-built sequences
            assert s["loss"] == pytest.approx(
                _manual_conditioned_loss(model, tok, ex.prompt, ex.answer), abs=1e-5
            )
            assert s["loss_answer"] == pytest.approx(_manual_answer_loss(model, tok, ex.answer), abs=1e-5)
        with torch.no_grad():
            ref = per_example_loss(
                model, make_batches([ex], tok, kind="causal-lm", max_length=32, batch_size=1)[0]
            )
        assert s["loss"] == pytest.approx(float(ref[0]), abs=1e-5)
        assert s["ifd"] == pytest.approx(s["loss"] / s["loss_answer"], rel=1e-9)


def test_ifd_with_chat_template(word_tokenizer):
    template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    tok = word_tokenizer(chat_template=template)
    model = tiny_llama()
    exs = [gen("what is good ?", "the film is good", "a"), gen("why ?", "one two three", "b")]
    scores = score_examples(model, tok, exs, kind="causal-lm", max_length=32, batch_size=2, progress=False)
    for ex, s in zip(exs, scores, strict=True):
        # The answer part of the template: the answer words and the closing </s>.
        answer_ids = tok(ex.answer + " </s>", add_special_tokens=False)["input_ids"]
        assert s["tokens"] == len(answer_ids)
        x = torch.tensor([[tok.bos_token_id] + answer_ids])
        with torch.no_grad():
            ref = float(F.cross_entropy(model(input_ids=x).logits[0, :-1], x[0, 1:]))
        assert s["loss_answer"] == pytest.approx(ref, abs=1e-5)
        assert s["ifd"] == pytest.approx(s["loss"] / s["loss_answer"], rel=1e-9)


def test_scoring_errors():
    model, tok = tiny_bert(), tokenizer()
    with pytest.raises(SensloraError, match="label"):
        score_examples(
            model, tok, [Example(text="good"), Example(text="bad")], kind="classification", progress=False
        )
    with pytest.raises(SensloraError, match="base"):
        score_examples(model, tok, [Example(text="good")], kind="base", progress=False)
    with pytest.raises(SensloraError, match="empty"):
        score_examples(model, tok, [], kind="classification", progress=False)


# ------------------------------------------------------------------------------ selection
def _loss_scores(values):
    exs = [Example(text=f"t{i}", label=0, id=f"e{i}") for i in range(len(values))]
    return exs, [{"id": ex.id, "loss": v} for ex, v in zip(exs, values, strict=True)]


def test_trimmed_loss_high_drops_suspected_noise_then_keeps_highest():
    values = [float((7 * i) % 40) for i in range(40)]  # a permutation of 0..39
    exs, scores = _loss_scores(values)
    kept, rec = select_by_quality(exs, scores, 0.5)
    assert rec["rule"] == "trimmed-loss-high" and rec["k"] == 20 and len(kept) == 20
    # The two highest losses (39, 38) are suspected noise; then 37 down to 18 are kept.
    assert sorted(values[int(e.id[1:])] for e in kept) == [float(v) for v in range(18, 38)]
    assert [e.id for e in kept] == rec["kept_ids"] == [e.id for e in exs if 18 <= values[int(e.id[1:])] <= 37]
    noise = [d for d in rec["dropped"] if "noise" in d["reason"]]
    assert sorted(values[int(d["id"][1:])] for d in noise) == [38.0, 39.0]
    assert len(rec["dropped"]) == 20 and rec["cut"] == 18.0 and rec["noise_cut"] == 38.0
    # Deterministic.
    assert select_by_quality(exs, scores, 0.5)[1] == rec


def test_stratified_selection_keeps_the_class_balance():
    # A random head favours class 0, so every class-1 example has a higher loss than any class-0 one:
    # unstratified, the loss rules would keep (almost) only class 1.
    labels = [i % 3 == 0 for i in range(30)]  # 10 of class 1, 20 of class 0
    exs = [Example(text=f"t{i}", label=int(y), id=f"e{i}") for i, y in enumerate(labels)]
    scores = [{"id": ex.id, "loss": (10.0 if ex.label else 1.0) + i / 100} for i, ex in enumerate(exs)]
    kept, rec = select_by_quality(exs, scores, 0.5, rule="loss-high")
    assert sum(e.label for e in kept) == 10  # the plain rule: all of class 1
    kept, rec = select_by_quality(exs, scores, 0.5, rule="loss-high", stratify=True)
    assert rec["stratified"] and len(kept) == 15
    assert sum(e.label for e in kept) == 5  # 1/3 of 15 is class 1, the highest-loss ones
    assert {e.id for e in kept if e.label} == {"e27", "e24", "e21", "e18", "e15"}
    assert {e.id for e in kept if not e.label} == {f"e{i}" for i in range(29, 14, -1) if i % 3}
    # keep = 0.5 of 7 items with labels 4:3 -> k = 3: shares 1.71 / 1.29 -> 2 and 1.
    exs7, scores7 = _loss_scores([float(i) for i in range(7)])
    for i, ex in enumerate(exs7):
        ex.label = int(i >= 4)
    kept, _ = select_by_quality(exs7, scores7, 0.5, rule="loss-low", stratify=True)
    assert [e.id for e in kept] == ["e0", "e1", "e4"]


def test_simple_loss_rules_and_ties():
    exs, scores = _loss_scores([3.0, 1.0, 2.0, 2.0, 0.5, None])
    kept, rec = select_by_quality(exs, scores, 0.5, rule="loss-high")
    assert rec["kept_ids"] == ["e0", "e2", "e3"]
    kept, rec = select_by_quality(exs, scores, 0.5, rule="loss-low")
    assert rec["kept_ids"] == ["e1", "e2", "e4"]  # 0.5, 1.0, then the first of the tied 2.0s
    assert {"id": "e5", "reason": "no loss (no tokens to score)"} in rec["dropped"]
    # With keep = 1 the unscorable item is used last.
    kept, rec = select_by_quality(exs, scores, 1.0, rule="loss-high")
    assert len(kept) == 6 and rec["dropped"] == []


def test_ifd_rule_filters_ifd_above_one_and_backfills():
    exs = [gen(f"p{i}", f"a{i}", f"g{i}") for i in range(6)]
    ifds = [0.5, 0.9, 1.3, 0.7, 1.1, None]
    scores = [{"id": e.id, "loss": 1.0, "ifd": v} for e, v in zip(exs, ifds, strict=True)]
    kept, rec = select_by_quality(exs, scores, 0.5)  # auto -> ifd
    assert rec["rule"] == "ifd" and rec["kept_ids"] == ["g0", "g1", "g3"]
    assert {"id": "g2", "reason": "IFD > 1 (the prompt does not help predict the answer)"} in rec["dropped"]
    # Asking for more than the IFD <= 1 pool uses the smallest IFD > 1 first.
    kept, rec = select_by_quality(exs, scores, 4 / 6)
    assert rec["kept_ids"] == ["g0", "g1", "g3", "g4"] and rec["set_aside_used"] == 1


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan")])
def test_bad_keep(keep):
    exs, scores = _loss_scores([1.0, 2.0, 3.0])
    with pytest.raises(SensloraError, match="data-keep"):
        select_by_quality(exs, scores, keep)


def test_selection_errors():
    exs, scores = _loss_scores([1.0])
    with pytest.raises(SensloraError, match="at least 2"):
        select_by_quality(exs, scores, 1.0)
    exs, scores = _loss_scores([1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(SensloraError, match="keeps 0 of 5"):
        select_by_quality(exs, scores, 0.1)
    with pytest.raises(SensloraError, match="unknown quality rule"):
        select_by_quality(exs, scores, 0.5, rule="best")
    with pytest.raises(SensloraError, match="ifd"):
        select_by_quality(exs, scores, 0.5, rule="ifd")


# --------------------------------------------------------------------------- end to end
def _chat():
    pairs = [
        ("what is your name", "my name is cat"),
        ("What is your name?", "My name is cat."),  # near duplicate
        ("how are you", "fine thanks"),
        ("why is the sky blue", "because light"),
        ("tell me a joke", ""),  # empty answer
        ("do you like it", "yes i like it"),
        ("who am i", "you are you"),
        ("is the movie good", "no it was awful"),
    ]
    return [gen(p, a, f"c{i}") for i, (p, a) in enumerate(pairs)]


def test_select_training_data_and_save(tmp_path):
    model, tok = tiny_llama(), tokenizer()
    kept, sel = select_training_data(
        model, tok, _chat(), kind="causal-lm", keep=0.5, max_length=32, batch_size=4, progress=False
    )
    assert sel.rule == "ifd" and len(sel.scores) == 6 and len(kept) == 3 == len(sel.kept_ids)
    assert [e.id for e in kept] == sel.kept_ids
    assert {"dedupe", "score", "forward"} <= set(sel.timings)
    assert {"id": "c1", "reason": "near-duplicate of c0", "stage": "dedupe"} in sel.dropped
    out = sel.save(tmp_path / "quality")
    summary = json.loads((out / "selection.json").read_text())
    assert summary["kept_ids"] == sel.kept_ids and summary["rule"] == "ifd"
    assert summary["counts"] == {"input": 8, "dropped_by_dedupe": 2, "scored": 6, "kept": 3, "dropped": 5}
    assert "forward" in summary["timings"]
    lines = (out / "scores.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [s["id"] for s in sel.scores]
    assert (out / "scores.png").stat().st_size > 0
    # The same call again gives the same selection.
    again = select_training_data(
        model, tok, _chat(), kind="causal-lm", keep=0.5, max_length=32, batch_size=2, progress=False
    )
    assert again[1].kept_ids == sel.kept_ids


def test_select_training_data_checks_options_first():
    model, tok = tiny_bert(), tokenizer()
    exs = [Example(text="good", label=1), Example(text="Good!", label=1), Example(text="bad", label=0)]
    with pytest.raises(SensloraError, match="data-keep"):
        select_training_data(model, tok, exs, kind="classification", keep=0)
    with pytest.raises(SensloraError, match="ifd"):
        select_training_data(model, tok, exs, kind="classification", rule="ifd")
    # 2 distinct examples left after dedupe; keep 0.4 of 2 keeps none.
    with pytest.raises(SensloraError, match="keeps 0 of 2"):
        select_training_data(model, tok, exs, kind="classification", keep=0.4, progress=False)


def test_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    sel = QualitySelection(
        scores=[{"id": "a", "loss": 1.0}], kept_ids=["a"], dropped=[], rule="loss-high", keep=1.0
    )

    def boom(self, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(QualitySelection, "plot", boom)
    with pytest.raises(RuntimeError):
        sel.save(tmp_path / "quality")
    assert list(tmp_path.iterdir()) == []
