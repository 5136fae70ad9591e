"""The data formats (TRL's text, messages, prompt-completion as text or turns, preference; alpaca and
ShareGPT): detection, loading from every source, the loss masks of the batches, tasks and
generation prompts, and every bad row."""

from __future__ import annotations

import json

import pytest

from senslora.core.errors import SensloraError
from senslora.data.examples import Example, load_examples, make_batches, prompt_ids
from senslora.data.formats import detect_format
from senslora.data.tasks import load_task

TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)
CHAT = [
    {"role": "user", "content": "what is one ?"},
    {"role": "assistant", "content": "two"},
    {"role": "user", "content": "why ?"},
    {"role": "assistant", "content": "hello world"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def chat_tok(word_tokenizer):
    return word_tokenizer(bos=False, chat_template=TEMPLATE)


def supervised(batch, tok, row=0) -> list[str]:
    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    return tok.convert_ids_to_tokens([i for i, label in zip(ids, labels, strict=True) if label != -100])


# ------------------------------------------------------------------------------------ detection
@pytest.mark.parametrize(
    "columns, expected",
    [
        (["messages", "text"], "messages"),
        (["prompt", "completion", "text"], "prompt-completion"),
        (["prompt", "text"], "text"),
        (["text", "label"], "text"),
        (["prompt", "chosen", "rejected"], "preference"),
        (["chosen", "rejected", "text"], "preference"),
        (["prompt", "completion", "chosen", "rejected"], "prompt-completion"),
        (["prompt", "chosen"], None),  # not TRL's preference format without a rejected column
        (["conversations", "system", "text"], "sharegpt"),
        (["instruction", "input", "output", "text"], "alpaca"),
        (["instruction", "text"], "text"),
    ],
)
def test_detection_from_the_columns(columns, expected):
    if expected is None:
        with pytest.raises(SensloraError, match="'chosen' and 'rejected' columns \\(preference\\)"):
            detect_format(columns, where="data")
    else:
        assert detect_format(columns, where="data") == expected


def test_undetectable_or_missing_columns_name_the_formats_and_the_columns():
    with pytest.raises(SensloraError) as err:
        detect_format(["question", "reply"], where="d.jsonl")
    message = str(err.value)
    assert "'messages' column (messages)" in message and "'prompt' and 'completion' columns" in message
    assert message.endswith("columns present: 'question', 'reply'")
    with pytest.raises(SensloraError, match=r"not in the prompt-completion format: no 'completion' column"):
        detect_format(["prompt", "text"], "prompt-completion", where="d.jsonl")


# ------------------------------------------------------------------------------------ loading
def test_messages_and_both_prompt_completion_forms_load_from_jsonl(tmp_path):
    [ex] = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]))
    assert ex.messages == CHAT and ex.answer == "hello world" and ex.loss_from == 0
    [ex] = load_examples(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the film", "completion": " is good"}]))
    assert ex.plain and (ex.prompt, ex.answer, ex.text) == ("the film", " is good", "the film is good")
    rows = [{"prompt": CHAT[:3], "completion": CHAT[3:]}]
    [ex] = load_examples(write_jsonl(tmp_path / "c.jsonl", rows))
    assert ex.messages == CHAT and ex.loss_from == 3 and ex.answer == "hello world"
    # Overridden: the same file read as text (its 'text' column) although it has 'messages'.
    both = write_jsonl(tmp_path / "b.jsonl", [{"messages": CHAT, "text": "plain"}])
    assert load_examples(both, data_format="text")[0].text == "plain"
    assert load_examples(both)[0].messages == CHAT


def test_preference_rows_read_the_chosen_response_as_the_completion(tmp_path):
    # TRL's four preference forms: explicit or implicit prompt, text or turns. The rejected response
    # is never read, so each equals the prompt-completion (or messages, or text) row it contains.
    other = [{"role": "assistant", "content": "no"}]
    forms = [
        ({"prompt": "the film", "chosen": " is good", "rejected": " is bad"},
         {"prompt": "the film", "completion": " is good"}),
        ({"prompt": CHAT[:3], "chosen": CHAT[3:], "rejected": other},
         {"prompt": CHAT[:3], "completion": CHAT[3:]}),
        ({"chosen": CHAT, "rejected": CHAT[:3] + other}, {"messages": CHAT}),
        ({"chosen": "the film is good", "rejected": "the film is bad"}, {"text": "the film is good"}),
    ]  # fmt: skip
    for i, (preference, same) in enumerate(forms):
        [got] = load_examples(write_jsonl(tmp_path / f"pref{i}.jsonl", [preference]))
        [want] = load_examples(write_jsonl(tmp_path / f"same{i}.jsonl", [same]))
        assert got == want, preference
    assert load_examples(write_jsonl(tmp_path / "p.jsonl", [forms[0][0]]), data_format="preference")[0].answer == " is good"


def test_sharegpt_and_alpaca_rows_are_the_conversations_they_hold(tmp_path):
    import csv

    system = {"role": "system", "content": "be brief"}
    sharegpt = {
        "conversations": [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in CHAT],
        "system": "be brief",
    }
    alpaca = {"instruction": "why", "input": "?", "output": "hello world", "system": "be brief",
              "history": [["what is one ?", "two"]]}  # fmt: skip
    want = [system, *CHAT[:2], {"role": "user", "content": "why\n?"}, CHAT[3]]
    [got] = load_examples(write_jsonl(tmp_path / "s.jsonl", [sharegpt]))
    assert got.messages == [system, *CHAT] and got.answer == "hello world" and got.loss_from == 0
    [got] = load_examples(write_jsonl(tmp_path / "a.jsonl", [alpaca]))
    assert got.messages == want and got.answer == "hello world"
    [got] = load_examples(write_jsonl(tmp_path / "a2.jsonl", [{"instruction": "what is one ?", "output": "two"}]))
    assert got.messages == CHAT[:2]
    with open(tmp_path / "s.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["conversations", "system"], [json.dumps(sharegpt["conversations"]), ""]])
    assert load_examples(tmp_path / "s.csv")[0].messages == CHAT


def test_unpaired_preference_reads_the_desirable_completions_only(tmp_path, caplog):
    # TRL's unpaired preference (KTO) data: prompt-completion rows with a boolean label.
    rows = [
        {"prompt": CHAT[:1], "completion": CHAT[1:2], "label": True},
        {"prompt": CHAT[:1], "completion": [{"role": "assistant", "content": "three"}], "label": False},
        {"prompt": CHAT[:3], "completion": CHAT[3:], "label": True},
    ]
    with caplog.at_level("WARNING", logger="senslora"):
        got = load_examples(write_jsonl(tmp_path / "kto.jsonl", rows))
    assert [(ex.id, ex.answer) for ex in got] == [("0", "two"), ("2", "hello world")]
    assert "left out 1 of 3 completions with label false" in caplog.text
    (tmp_path / "kto.csv").write_text('prompt,completion,label\nthe film, is good,True\nthe film, is bad,false\n')
    assert [ex.answer for ex in load_examples(tmp_path / "kto.csv")] == [" is good"]
    # A label column that is not boolean is not TRL's: every row is read, as before.
    numbers = [{"prompt": "a", "completion": " b", "label": 0}, {"prompt": "c", "completion": " d", "label": 1}]
    assert len(load_examples(write_jsonl(tmp_path / "n.jsonl", numbers))) == 2
    mixed = [rows[0], {**rows[2], "label": "maybe"}]
    with pytest.raises(SensloraError, match=r"kto2.jsonl line 2: column 'label' holds true / false .* here 'maybe'"):
        load_examples(write_jsonl(tmp_path / "kto2.jsonl", mixed))
    with pytest.raises(SensloraError, match="every completion has label false"):
        load_examples(write_jsonl(tmp_path / "kto3.jsonl", [rows[1]]))
    task = load_task(f"jsonl:{write_jsonl(tmp_path / 'kto4.jsonl', [rows[0], rows[1]] * 10)}")
    assert task.describe() == "generation (prompt-completion format)"
    assert {ex.answer for part in (task.train, task.validation, task.test) for ex in part} == {"two"}


def test_prompt_only_data_is_not_detected_but_reads_as_text_with_its_column_named(tmp_path):
    path = write_jsonl(tmp_path / "grpo.jsonl", [{"prompt": "the sky is"}])
    with pytest.raises(SensloraError, match="cannot tell the data format .* columns present: 'prompt'"):
        load_examples(path)
    [ex] = load_examples(path, text_column="prompt")
    assert (ex.text, ex.prompt, ex.answer, ex.messages) == ("the sky is", None, None, None)


def test_parquet_csv_and_datasets_folders_hold_conversations(tmp_path):
    import csv

    import datasets

    datasets.Dataset.from_list([{"messages": CHAT}] * 3).to_parquet(str(tmp_path / "m.parquet"))
    assert [ex.messages for ex in load_examples(tmp_path / "m.parquet")] == [CHAT] * 3
    datasets.Dataset.from_list([{"prompt": CHAT[:1], "completion": CHAT[1:2]}] * 2).save_to_disk(tmp_path / "disk")
    assert [ex.loss_from for ex in load_examples(tmp_path / "disk")] == [1, 1]
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["messages"], [json.dumps(CHAT)]])
    assert load_examples(tmp_path / "m.csv")[0].messages == CHAT
    rows = [{"prompt": CHAT[:1], "chosen": CHAT[1:2], "rejected": CHAT[3:]}] * 2
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "pref")
    assert [(ex.loss_from, ex.answer) for ex in load_examples(tmp_path / "pref")] == [(1, "two")] * 2


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: the conversation has no assistant turn"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "line 2: turn 1 of 'messages' has the unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "line 2: turn 1 of 'messages' has list content"),
        ({"messages": "hello"}, "line 2: column 'messages' must hold a list .* its text is not JSON"),
        ({"messages": []}, "line 2: column 'messages' must hold a list of .* found an empty list"),
        ({"prompt": "hi", "completion": CHAT[1:2]}, "line 2: 'prompt' and 'completion' must both be text"),
        ({"prompt": CHAT[:1], "completion": CHAT[:1]}, "line 2: the completion has no assistant turn"),
        ({"prompt": "hi", "chosen": CHAT[1:2], "rejected": "no"}, "line 2: 'prompt' and 'chosen' must both be text"),
        ({"prompt": None, "chosen": CHAT[:1], "rejected": []}, "line 2: the chosen conversation has no assistant turn"),
        ({"prompt": CHAT[:1], "chosen": "two", "rejected": ""}, "line 2: 'prompt' and 'chosen' must both be text"),
        ({"conversations": [{"from": "bot", "value": "hi"}]}, "line 2: turn 1 of 'conversations' is from the unknown speaker 'bot'"),
        ({"conversations": [{"role": "user", "content": "hi"}]}, "line 2: turn 1 of 'conversations' is not a {from, value} object"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "line 2: the conversation has no assistant turn"),
        ({"instruction": "hi", "output": 3}, "line 2: column 'output' holds int; it must be text"),
        ({"instruction": "hi", "output": "yo", "history": [["a"]]}, "line 2: item 1 of 'history' is not an .instruction, response. pair"),
    ],
)
def test_bad_rows_are_one_line_errors_naming_the_row(tmp_path, row, message):
    if "messages" in row:
        good = {"messages": CHAT}
    elif "conversations" in row:
        good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    elif "instruction" in row:
        good = {"instruction": "hi", "output": "yo"}
    elif "chosen" in row:
        good = {"prompt": CHAT[:1], "chosen": CHAT[1:2], "rejected": CHAT[3:]}
    else:
        good = {"prompt": CHAT[:1], "completion": CHAT[1:2]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, row])
    with pytest.raises(SensloraError, match=message) as err:
        load_examples(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_chat_formats_have_no_label_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(SensloraError, match="messages format, which has no label column; drop --label-column"):
        load_examples(path, label_column="label", data_format="messages")
    with pytest.raises(SensloraError, match="one text per line, not the messages format"):
        load_examples(write_jsonl(tmp_path / "d.txt", []), data_format="messages")


# ------------------------------------------------------------------------------------ batches
def test_messages_take_the_loss_on_every_assistant_turn_only(chat_tok):
    ex = Example("", messages=CHAT, prompt="", answer="hello world", id="7")
    batch = make_batches([ex], chat_tok, kind="causal-lm", max_length=64)[0]
    text = chat_tok.decode(batch["input_ids"][0].tolist()).split()
    assert text == "<s> user what is one ? </s> <s> assistant two </s> <s> user why ? </s> <s> assistant hello world </s>".split()
    assert supervised(batch, chat_tok) == ["two", "</s>", "hello", "world", "</s>"]
    # The conversation's prompt for generation: every turn before the last answer, then the cue.
    cue = chat_tok.decode(prompt_ids(ex, chat_tok)).split()
    assert cue == text[:-3]


def test_a_two_turn_conversation_is_exactly_a_prompt_answer_pair(chat_tok):
    pair = Example("", prompt="what is one ?", answer="two")
    turns = Example("", messages=CHAT[:2], prompt="what is one ?", answer="two")
    a, b = (make_batches([ex], chat_tok, kind="causal-lm")[0] for ex in (pair, turns))
    assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["labels"].tolist() == b["labels"].tolist()
    assert prompt_ids(pair, chat_tok) == prompt_ids(turns, chat_tok)


def test_conversational_prompt_completion_takes_the_loss_on_the_completion(chat_tok, tmp_path):
    [ex] = load_examples(write_jsonl(tmp_path / "c.jsonl", [{"prompt": CHAT[:3], "completion": CHAT[3:]}]))
    assert supervised(make_batches([ex], chat_tok, kind="causal-lm")[0], chat_tok) == ["hello", "world", "</s>"]


def test_standard_prompt_completion_is_the_texts_as_they_are(word_tokenizer):
    tok = word_tokenizer()  # no chat template: it is not needed
    ex = Example("the film is good", prompt="the film", answer=" is good", plain=True)
    batch = make_batches([ex], tok, kind="causal-lm")[0]
    assert tok.convert_ids_to_tokens(batch["input_ids"][0].tolist()) == ["<s>", "the", "film", "is", "good", "</s>"]
    assert supervised(batch, tok) == ["is", "good", "</s>"]
    assert tok.convert_ids_to_tokens(prompt_ids(ex, tok)) == ["<s>", "the", "film"]


# Qwen3's behaviour in the word vocabulary: the assistant turn after the last user turn, when it
# ends the rendering, carries a (here: "very very") reasoning block; earlier ones do not.
LAST_TURN_TEMPLATE = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last and loop.last %}"
    "<s> assistant very very {{ m['content'] }} </s> "
    "{%- else %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<s> assistant {% endif %}"
)


def test_a_template_that_rewrites_earlier_turns_takes_the_loss_on_the_last_turn(word_tokenizer, caplog):
    tok = word_tokenizer(bos=False, chat_template=LAST_TURN_TEMPLATE)
    ex = Example("", messages=CHAT, prompt="", answer="hello world", id="3")
    with caplog.at_level("WARNING", logger="senslora"):
        [batch] = make_batches([ex, ex], tok, kind="causal-lm", max_length=64)
    text = tok.decode(batch["input_ids"][0].tolist()).split()
    assert text == "<s> user what is one ? </s> <s> assistant two </s> <s> user why ? </s> <s> assistant very very hello world </s>".split()
    assert supervised(batch, tok) == ["very", "very", "hello", "world", "</s>"]  # the last turn only
    assert caplog.text.count("the loss is on the last assistant turn") == 1  # once per tokenizer
    # One assistant turn: nothing to tell apart, no warning.
    caplog.clear()
    with caplog.at_level("WARNING", logger="senslora"):
        one = make_batches([Example("", messages=CHAT[:2], answer="two")], tok, kind="causal-lm")[0]
    assert supervised(one, tok) == ["very", "very", "two", "</s>"] and not caplog.text


TOOL_TEMPLATE = (
    "{%- if tools %}<s> the {% for t in tools %}{{ t['function']['name'] }} {% endfor %}</s> {% endif %}"
    "{%- for m in messages %}<s> {{ m['role'] }} {{ m['content'] }}"
    "{%- if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %} {{ c['function']['name'] }} "
    "{{ c['function']['arguments']['x'] }}{% endfor %}{% endif %} </s> {% endfor %}"
    "{%- if add_generation_prompt %}<s> assistant {% endif %}"
)
CALL = {"type": "function", "function": {"name": "hello", "arguments": {"x": "one"}}}
TOOL_CHAT = [
    {"role": "user", "content": "what is one ?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "name": "hello", "content": "two"},
    {"role": "assistant", "content": "two"},
]
TOOLS = [{"type": "function", "function": {"name": "hello", "parameters": {"type": "object"}}}]


def test_tool_calling_conversations_reach_the_template_and_train_on_the_calls(word_tokenizer, tmp_path):
    import datasets

    tok = word_tokenizer(bos=False, chat_template=TOOL_TEMPLATE)
    [ex] = load_examples(write_jsonl(tmp_path / "tools.jsonl", [{"messages": TOOL_CHAT, "tools": TOOLS}]))
    assert ex.tools == TOOLS and ex.messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert ex.messages[2] == {"role": "tool", "content": "two", "name": "hello"}
    batch = make_batches([ex], tok, kind="causal-lm", max_length=64)[0]
    text = tok.decode(batch["input_ids"][0].tolist()).split()
    assert text == (
        "<s> the hello </s> <s> user what is one ? </s> <s> assistant hello one </s> "
        "<s> [UNK] two </s> <s> assistant two </s>"  # "tool" is not in the word vocabulary
    ).split()
    assert supervised(batch, tok) == ["hello", "one", "</s>", "two", "</s>"]  # the call and the answer
    # A datasets folder unifies the turns' keys (absent ones become None): the same example.
    datasets.Dataset.from_list([{"messages": TOOL_CHAT, "tools": TOOLS}]).save_to_disk(tmp_path / "disk")
    [again] = load_examples(tmp_path / "disk")
    assert again.messages == ex.messages and again.tools[0]["function"]["name"] == "hello"
    bad = [{"messages": [TOOL_CHAT[0], {"role": "user", "content": "hi", "tool_calls": [CALL]}, TOOL_CHAT[3]]}]
    with pytest.raises(SensloraError, match="turn 2 of 'messages' has tool_calls that are not a list of calls of an assistant"):
        load_examples(write_jsonl(tmp_path / "bad.jsonl", bad))


def test_an_assistant_turn_s_reasoning_reaches_the_template(word_tokenizer, tmp_path):
    template = (
        "{%- for m in messages %}<s> {{ m['role'] }} "
        "{%- if m['reasoning_content'] is defined %} very {{ m['reasoning_content'] }} very{% endif %}"
        " {{ m['content'] }} </s> {% endfor %}{%- if add_generation_prompt %}<s> assistant {% endif %}"
    )
    tok = word_tokenizer(bos=False, chat_template=template)
    turns = [CHAT[0], {**CHAT[1], "reasoning_content": "one and one"}]
    [ex] = load_examples(write_jsonl(tmp_path / "r.jsonl", [{"messages": turns}]))
    batch = make_batches([ex], tok, kind="causal-lm")[0]
    assert supervised(batch, tok) == ["very", "one", "[UNK]", "one", "very", "two", "</s>"]


def test_long_conversations_keep_an_assistant_token(chat_tok):
    turns = [{"role": "user", "content": " ".join(["one"] * 40)}, {"role": "assistant", "content": "two three"}]
    batch = make_batches([Example("", messages=turns, answer="two three")], chat_tok, kind="causal-lm", max_length=16)[0]
    assert batch["input_ids"].shape == (1, 16) and supervised(batch, chat_tok)[:2] == ["two", "three"]


def test_a_missing_or_unusable_chat_template_names_the_example(word_tokenizer, chat_tok):
    ex = Example("", messages=CHAT, answer="hello world", id="12")
    with pytest.raises(SensloraError, match="example 12 is a conversation, and the tokenizer has no chat template"):
        make_batches([ex], word_tokenizer(), kind="causal-lm")
    chat_tok.chat_template = "{{ messages | length }} {% for m in messages %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(SensloraError, match="does not render example 12 turn by turn"):
        make_batches([ex], chat_tok, kind="causal-lm")
    chat_tok.chat_template = "{{ raise_exception('no tools here') }}"
    with pytest.raises(SensloraError, match="chat template fails on example 12 .*no tools here"):
        make_batches([ex], chat_tok, kind="causal-lm")


# ------------------------------------------------------------------------------------ tasks
def _conversations(n: int = 20) -> list[dict]:
    words = "one two three four five six seven eight nine ten".split()
    return [
        {"messages": [{"role": "user", "content": f"what is {words[i % 9]} ?"},
                      {"role": "assistant", "content": words[i % 9 + 1]}]}
        for i in range(n)
    ]  # fmt: skip


def test_chat_files_are_generation_tasks_without_a_label_column(tmp_path):
    rows = _conversations()
    task = load_task(f"jsonl:{write_jsonl(tmp_path / 'm.jsonl', rows)}")
    assert task.problem == "generation" and task.describe() == "generation (messages format)"
    assert len(task.train) == 16 and all(ex.messages and ex.answer for ex in task.test)
    pc = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows]
    task = load_task(f"jsonl:{write_jsonl(tmp_path / 'pc.jsonl', pc)}")
    assert task.describe() == "generation (prompt-completion format)" and task.test[0].loss_from == 1
    with pytest.raises(SensloraError, match="messages format, which is generation data; drop --problem classification"):
        load_task(f"jsonl:{tmp_path / 'm.jsonl'}", problem="classification", data_format="messages")
    with pytest.raises(SensloraError, match="task chat-qa has its own data format"):
        load_task("chat-qa", data_format="messages")
    pref = [{"prompt": r["messages"][:1], "chosen": r["messages"][1:], "rejected": []} for r in rows]
    task = load_task(f"jsonl:{write_jsonl(tmp_path / 'pref.jsonl', pref)}")
    assert task.describe() == "generation (preference format)"
    assert [ex.answer for ex in task.test] == [ex.answer for ex in load_task(f"jsonl:{tmp_path / 'pc.jsonl'}").test]
    alpaca = [{"instruction": r["messages"][0]["content"], "output": r["messages"][1]["content"]} for r in rows]
    task = load_task(f"jsonl:{write_jsonl(tmp_path / 'alpaca.jsonl', alpaca)}")
    assert task.describe() == "generation (alpaca format)"
    assert [ex.messages for ex in task.test] == [ex.messages for ex in load_task(f"jsonl:{tmp_path / 'm.jsonl'}").test]
    # TRL's implicit-prompt text form has no prompt to generate from: calibration data only.
    implicit = [{"chosen": f"say {r['messages'][1]['content']}", "rejected": "no"} for r in rows]
    with pytest.raises(SensloraError, match=r"line 1: a preference row with a text 'chosen' and no 'prompt'"):
        load_task(f"jsonl:{write_jsonl(tmp_path / 'implicit.jsonl', implicit)}")
    assert len(load_examples(tmp_path / "implicit.jsonl")) == len(rows)


def test_a_datasets_folder_with_splits_keeps_its_test_split_of_conversations(tmp_path):
    import datasets

    rows = _conversations(30)
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows[:20]), test=datasets.Dataset.from_list(rows[20:])
    ).save_to_disk(tmp_path / "disk")
    task = load_task(f"disk:{tmp_path / 'disk'}")
    assert (len(task.train), len(task.validation), len(task.test)) == (18, 2, 10)


# ------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def chat_assets(tmp_path_factory):
    """A tiny chat LLaMA folder (word tokenizer + template) and the same pairs in three formats."""
    from conftest import make_word_tokenizer
    from tiny import save_tiny_chat_llama

    root = tmp_path_factory.mktemp("chat")
    save_tiny_chat_llama(root / "llama", make_word_tokenizer(bos=False, chat_template=TEMPLATE))
    rows = _conversations(20)
    write_jsonl(root / "messages.jsonl", rows)
    write_jsonl(root / "pc.jsonl", [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
    write_jsonl(
        root / "pc-text.jsonl",
        [{"prompt": r["messages"][0]["content"], "completion": " " + r["messages"][1]["content"]} for r in rows],
    )
    rejected = [{"role": "assistant", "content": "no"}]
    write_jsonl(
        root / "pref.jsonl",
        [{"prompt": r["messages"][:1], "chosen": r["messages"][1:], "rejected": rejected} for r in rows],
    )
    speaker = {"user": "human", "assistant": "gpt"}
    write_jsonl(
        root / "sharegpt.jsonl",
        [{"conversations": [{"from": speaker[t["role"]], "value": t["content"]} for t in r["messages"]]} for r in rows],
    )
    write_jsonl(
        root / "alpaca.jsonl",
        [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]} for r in rows],
    )
    return root


@pytest.mark.parametrize("data", ["messages.jsonl", "pc.jsonl", "pc-text.jsonl", "pref.jsonl", "sharegpt.jsonl"])
def test_allocate_calibrates_on_each_format_without_renaming(chat_assets, tmp_path, capsys, data):
    from senslora.cli.main import main

    out = tmp_path / "alloc"
    args = ["allocate", "--model", str(chat_assets / "llama"), "--calib", str(chat_assets / data)]
    args += ["--estimator", "fisher", "--calib-samples", "8", "--avg-rank", "2", "--no-plot", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "allocation.json").read_text())["calibration"]["examples"] == 8


def test_the_same_conversations_in_every_chat_format_give_the_same_allocation(chat_assets, tmp_path, capsys):
    from senslora.cli.main import main

    got = {}
    for data in ("messages.jsonl", "pc.jsonl", "pref.jsonl", "sharegpt.jsonl", "alpaca.jsonl"):
        out = tmp_path / data
        args = ["allocate", "--model", str(chat_assets / "llama"), "--calib", str(chat_assets / data), "--seed", "3"]
        args += ["--estimator", "fisher", "--calib-samples", "8", "--avg-rank", "2", "--no-plot", "--no-progress"]
        assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
        saved = json.loads((out / "allocation.json").read_text())
        got[data] = [(m["name"], m["rank"], m["s_global"]) for m in saved["matrices"]]
    assert all(ranks == got["messages.jsonl"] for ranks in got.values()), {k: v[:2] for k, v in got.items()}


def test_train_senslora_on_messages_and_prompt_completion_tasks(chat_assets, tmp_path, capsys):
    from senslora.cli.main import main

    for data in ("messages.jsonl", "pc.jsonl"):
        out = tmp_path / data
        args = ["train", "--method", "senslora", "--model", str(chat_assets / "llama")]
        args += ["--task", f"jsonl:{chat_assets / data}", "--epochs", "1", "--batch-size", "8", "--avg-rank", "2"]
        args += ["--max-new-tokens", "2", "--calib-samples", "8", "--option", "plot=false", "--no-progress"]
        assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
        result = json.loads((out / "result.json").read_text())
        assert result["labels"] == f"generation ({data.split('.')[0].replace('pc', 'prompt-completion')} format)"
        assert set(result["metrics"]) == {"bleu", "rouge1", "rouge2", "rougeL", "eval_loss"}


def test_undetectable_calibration_is_one_line_and_writes_nothing(chat_assets, tmp_path, capsys):
    from senslora.cli.main import main

    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "why ?", "reply": "two"}])
    out = tmp_path / "alloc"
    code = main(["allocate", "--model", str(chat_assets / "llama"), "--calib", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("senslora:")]
    assert code == 2 and len(lines) == 1 and lines[0].endswith("columns present: 'question', 'reply'")
    assert not out.exists()


@pytest.mark.slow
def test_smollm2_calibrates_on_a_messages_file(tmp_path, capsys):
    from senslora.cli.main import main

    data = write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}] * 4)
    out = tmp_path / "alloc"
    args = ["allocate", "--model", "smollm2", "--calib", str(data), "--estimator", "fisher", "--calib-samples", "4"]
    assert main([*args, "--no-plot", "--no-progress", "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "allocation.json").read_text())["calibration"]["examples"] == 4


def test_show_data_prints_the_sample_with_the_loss_tokens_marked_without_loading_weights(chat_assets, tmp_path, capsys):
    import shutil

    from senslora.cli.main import main

    folder = tmp_path / "no-weights"  # config and tokenizer only: show-data needs no weights
    shutil.copytree(chat_assets / "llama", folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    args = ["show-data", "--model", str(folder), "--calib", str(chat_assets / "sharegpt.jsonl")]
    assert main([*args, "--calib-samples", "4", "--examples", "1"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "sharegpt.jsonl: 20 examples, 4 in the calibration sample (seed 0), tokenised for a causal-lm model" in out
    assert "the loss is on" in out and out.count("--- example") == 1
    shown = out.split("--- example")[1].splitlines()[1]
    # The answer and its end-of-turn token, marked; the user turn and the assistant header are not.
    assert shown.startswith("<s> user what is") and shown.count("\u27e6") == 1, shown
    assert "<s> assistant\u27e6" in shown and shown.endswith(" </s>\u27e7"), shown
    code = main(["show-data", "--model", str(folder), "--calib", str(tmp_path / "missing.jsonl")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("senslora:")]
    assert code == 2 and len(lines) == 1
