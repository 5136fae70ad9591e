"""TRL as a real client: SFTTrainer trains a tiny LLaMA from senslora's allocation, handed over as
(a) ``allocation.to_lora_config()`` (``peft_config``) and (b) a saved adapter loaded with
``PeftModel.from_pretrained(model, "adapter/", is_trainable=True)`` (what ``allocate`` writes and
axolotl / LLaMA-Factory load), on data in each of TRL's four formats; DPOTrainer trains an
allocation calibrated on its own preference data. The adapter TRL saves keeps every per-module
rank and shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import tiny_llama

from senslora.core.peft_bridge import peft_ranks, peft_scalings
from senslora.core.pipeline import allocate
from senslora.data.examples import load_examples, make_batches

TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)
WORDS = "one two three four five six seven eight nine ten".split()
ROOT = Path(__file__).resolve().parents[1]


def _pairs(n: int = 12) -> list[tuple[str, str]]:
    return [(f"what is {WORDS[i % 9]} ?", WORDS[i % 9 + 1]) for i in range(n)]


def _rows(fmt: str) -> list[dict]:
    """The same pairs in one of TRL's four formats."""
    rows = []
    for q, a in _pairs():
        user, bot = {"role": "user", "content": q}, {"role": "assistant", "content": a}
        rows.append(
            {
                "text": {"text": f"{q} {a}"},
                "messages": {"messages": [user, bot]},
                "prompt-completion": {"prompt": q, "completion": f" {a}"},
                "conversational": {"prompt": [user], "completion": [bot]},
            }[fmt]
        )
    return rows


FORMATS = ("text", "messages", "prompt-completion", "conversational")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The tokenizer, the allocation (Fisher on a messages file: loss on the assistant turns) and
    the base LoraConfig; the ranks differ between matrices, so a lost pattern would show."""
    from conftest import make_word_tokenizer

    root = tmp_path_factory.mktemp("trl")
    tok = make_word_tokenizer(bos=False, chat_template=TEMPLATE)
    tok.pad_token = "[UNK]"
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps(row) + "\n" for row in _rows("messages")))
    batches = make_batches(load_examples(calib), tok, kind="causal-lm", batch_size=4)
    alloc = allocate(tiny_llama(vocab_size=len(tok)), batches, avg_rank=2, estimator="fisher", progress=False)
    assert len(set(alloc.ranks.values())) > 1
    base = LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM")
    return root, tok, alloc, base


def _short_run(config_class, out: Path):
    """Two CPU steps of a TRL trainer (``SFTConfig`` or ``DPOConfig``), nothing saved on the way."""
    return config_class(
        output_dir=str(out / "trainer"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=32,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        gradient_checkpointing=False,
        seed=0,
    )


def _sft(model, tok, fmt: str, out: Path, peft_config=None):
    import datasets
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=_short_run(SFTConfig, out),
        train_dataset=datasets.Dataset.from_list(_rows(fmt)),
        processing_class=tok,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return trainer


def _check_saved(folder: Path, alloc, vocab_size: int, base: LoraConfig) -> None:
    """The adapter TRL saved: every matrix at its allocated rank, A (r, d_in) and B (d_out, r), and
    it loads back with the same ranks and scalings as the allocation's LoraConfig."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    prefix = "base_model.model."
    shapes = {m.name: m.shape for m in alloc.matrices}
    seen = {}
    for key, tensor in weights.items():
        name, _, part = key[len(prefix) :].rpartition(".lora_")
        seen.setdefault(name, {})[part] = tuple(tensor.shape)
    assert set(seen) == set(alloc.ranks)
    for name, rank in alloc.ranks.items():
        d_out, d_in = shapes[name]
        assert seen[name] == {"A.weight": (rank, d_in), "B.weight": (d_out, rank)}, name
    assert any(weights[k].abs().sum() > 0 for k in weights if ".lora_B." in k)  # trained (B starts at 0)
    loaded = PeftModel.from_pretrained(tiny_llama(vocab_size=vocab_size), str(folder))
    assert peft_ranks(loaded) == alloc.ranks
    expected = get_peft_model(tiny_llama(vocab_size=vocab_size), alloc.to_lora_config(base))
    assert peft_scalings(loaded) == peft_scalings(expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sft_trainer_from_the_lora_config_keeps_every_rank(setting, tmp_path, fmt):
    _, tok, alloc, base = setting
    _sft(tiny_llama(vocab_size=len(tok)), tok, fmt, tmp_path, peft_config=alloc.to_lora_config(base))
    _check_saved(tmp_path / "adapter", alloc, len(tok), base)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sft_trainer_continues_the_saved_adapter_trainable(setting, tmp_path, fmt):
    _, tok, alloc, base = setting
    start = tmp_path / "start"
    get_peft_model(tiny_llama(vocab_size=len(tok)), alloc.to_lora_config(base)).save_pretrained(str(start))
    model = PeftModel.from_pretrained(tiny_llama(vocab_size=len(tok)), str(start), is_trainable=True)
    assert peft_ranks(model) == alloc.ranks
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == alloc.trainable_params
    _sft(model, tok, fmt, tmp_path)
    _check_saved(tmp_path / "adapter", alloc, len(tok), base)


def test_the_example_runs_the_whole_path_on_tiny_sizes(tmp_path):
    """examples/trl_sft.py --tiny: allocate, SFTTrainer, save, reload with every rank (as CI runs it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "trl_sft.py"), "--tiny", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adapter init gradient" in proc.stdout  # TRL trains the default's initialised adapter
    assert "every per-module rank kept" in proc.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def _preference_rows() -> list[dict]:
    """TRL's preference format (explicit prompt, turns): the right answer chosen, a wrong one rejected."""
    rows = []
    for i, (q, a) in enumerate(_pairs()):
        wrong = WORDS[(i + 3) % 10]
        rows.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return rows


def test_dpo_trainer_trains_an_allocation_calibrated_on_its_preference_data(setting, tmp_path):
    """DPO users: calibrate on the preference file itself (the loss of the chosen responses), then
    hand the ranks to TRL's DPOTrainer; the adapter it saves keeps every allocated rank."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    _, tok, _, base = setting
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _preference_rows()))
    batches = make_batches(load_examples(data), tok, kind="causal-lm", batch_size=4)
    alloc = allocate(tiny_llama(vocab_size=len(tok)), batches, avg_rank=2, estimator="fisher", progress=False)
    assert len(set(alloc.ranks.values())) > 1
    trainer = DPOTrainer(
        model=tiny_llama(vocab_size=len(tok)),
        args=_short_run(DPOConfig, tmp_path),
        train_dataset=datasets.Dataset.from_list(_preference_rows()),
        processing_class=tok,
        peft_config=alloc.to_lora_config(base),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    _check_saved(tmp_path / "adapter", alloc, len(tok), base)
