"""QLoRA's base: a bitsandbytes 4-bit model. Its target matrices have their real shapes (not the
packed bytes), the activation allocation, the Fisher diagonal and the gradient init run on it and
equal those of its dequantised twin (the same matrices in float32), PEFT builds the initialised
LoRA adapter on the 4-bit layers and it trains; what needs a weight gradient or the weights
themselves is a one-line error. bitsandbytes runs on the CPU here (its `test` extra)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama, token_batches

from senslora.core.errors import SensloraError
from senslora.core.estimators import ESTIMATORS, estimate_diagonals
from senslora.core.peft_bridge import peft_ranks
from senslora.core.pipeline import allocate
from senslora.core.targets import find_targets

# Dimensions bitsandbytes' CPU kernels accept (multiples of its blocks).
DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2)


@pytest.fixture
def pair(tmp_path_factory):
    """(the 4-bit model, its twin in float32 whose linear weights are the 4-bit ones dequantised).
    Fresh for every test: a forward pass outside senslora (the training steps below) lets
    bitsandbytes repack the 4-bit weights for its CPU inference kernel, whose numbers differ."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tmp_path_factory.mktemp("quantized") / "llama"
    tiny_llama(**DIMS).save_pretrained(folder)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
    twin = tiny_llama(**DIMS)  # same seed: the same embeddings, norms and head as the saved model
    quantised = [(name, m) for name, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 14  # every linear layer of the two blocks
    with torch.no_grad():
        for name, m in quantised:
            twin.get_submodule(name).weight.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
    return q, twin


def _batches():
    return token_batches(3, batch_size=4, labels="lm")


def test_the_targets_of_a_4bit_model_have_the_shapes_of_its_matrices(pair):
    q, twin = pair
    shapes = [(t.name, t.shape) for t in find_targets(q)]
    assert shapes == [(t.name, t.shape) for t in find_targets(twin)]
    assert ("model.layers.0.mlp.down_proj", (64, 128)) in shapes  # not the packed (4096, 1) bytes
    assert all(t.quantized for t in find_targets(q)) and not any(t.quantized for t in find_targets(twin))


@pytest.mark.parametrize("estimator", ["activation", "fisher"])
def test_allocating_on_a_4bit_model_equals_its_dequantised_twin(pair, estimator):
    q, twin = pair
    got, want = (allocate(m, _batches(), avg_rank=2, estimator=estimator, init="zero", progress=False) for m in pair)
    assert got.ranks == want.ranks
    for a, b in zip(got.matrices, want.matrices, strict=True):
        assert a.s_global == pytest.approx(b.s_global, rel=1e-3), a.name


def test_the_gradient_init_on_a_4bit_model_equals_the_twins_and_the_adapter_trains(pair):
    from peft import LoraConfig

    q, twin = pair
    base = LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM")
    adapters = {}
    for name, model in (("4bit", q), ("twin", twin)):
        alloc = allocate(model, _batches(), avg_rank=2, init="gradient", progress=False)
        assert alloc.init == "gradient" and not alloc.init_fallback
        assert alloc.quantized == ("4bit" if name == "4bit" else "")
        peft_model = alloc.to_peft_model(model, base, batches=_batches())
        assert peft_ranks(peft_model) == alloc.ranks
        adapters[name] = {k: v.detach().clone() for k, v in peft_model.named_parameters() if "lora_" in k}
        if name == "4bit":
            import bitsandbytes as bnb

            wrapped = peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
            assert isinstance(wrapped.base_layer, bnb.nn.Linear4bit)  # PEFT's QLoRA layer, not a copy
            _trains(peft_model)
    assert adapters["4bit"].keys() == adapters["twin"].keys()
    for key, value in adapters["4bit"].items():
        torch.testing.assert_close(value, adapters["twin"][key], rtol=1e-3, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in adapters["4bit"].items() if "lora_B" in k)  # not PEFT's zero B


def _trains(peft_model) -> None:
    batch = _batches()[0]
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    losses = []
    for _ in range(3):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_every_estimator_runs_on_4bit_targets_unless_it_declares_weight_gradients(pair, estimator):
    """The registry's contract (``Estimator.weight_grads``): kept by each estimator."""
    q, twin = pair
    targets = find_targets(q)
    batches = _batches()
    if ESTIMATORS[estimator].weight_grads:
        with pytest.raises(SensloraError, match=f"the {estimator} estimator differentiates every target weight"):
            estimate_diagonals(estimator, q, batches, targets, progress=False)
        return
    got = estimate_diagonals(estimator, q, batches, targets, progress=False)
    want = estimate_diagonals(estimator, twin, batches, find_targets(twin), progress=False)
    for t in targets:
        torch.testing.assert_close(got[t.name].dense(), want[t.name].dense(), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"estimator": "hutchinson"}, "the hutchinson estimator differentiates every target weight, and .* is quantised"),
        ({"saliency": "obd", "init": "zero"}, "--saliency obd needs the weights, and .* is quantised"),
        ({"init": "pissa"}, "--init pissa cannot run: the model's linear weights are quantised"),
    ],
)
def test_what_needs_weight_gradients_or_values_is_a_one_line_error(pair, kwargs, message):
    with pytest.raises(SensloraError, match=message) as err:
        allocate(pair[0], _batches(), avg_rank=2, progress=False, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_cli_allocates_on_the_quantised_model_and_the_snippets_train_on_it(tmp_path, capsys, bits):
    import json

    import yaml
    from conftest import make_word_tokenizer

    from senslora.cli.main import main

    folder = tmp_path / "llama"
    tiny_llama(**DIMS).save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    (tmp_path / "calib.txt").write_text("hello world\nthe cat sat on the mat\n" * 8)
    out = tmp_path / "alloc"
    args = ["allocate", "--model", str(folder), "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "8"]
    args += ["--avg-rank", "2", "--no-plot", "--no-progress", "--quantize", bits, "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert f"allocated on the {bits} model (bitsandbytes)" in capsys.readouterr().out
    saved = json.loads((out / "allocation.json").read_text())
    assert saved["quantized"] == bits and saved["init"] == "gradient" and not saved["init_fallback"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    axolotl = yaml.safe_load((out / "axolotl.yaml").read_text())
    assert axolotl["adapter"] == ("qlora" if bits == "4bit" else "lora") and axolotl[f"load_in_{bits}"] is True
    assert yaml.safe_load((out / "llamafactory.yaml").read_text())["quantization_bit"] == int(bits[0])


def test_quantising_without_bitsandbytes_is_one_line(monkeypatch):
    import sys

    from senslora.data.models import quantization_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(SensloraError, match="^--quantize 4bit needs bitsandbytes; pip install bitsandbytes$"):
        quantization_config("4bit", torch.float32)
    with pytest.raises(SensloraError, match="--quantize '2bit' is not supported; use one of 4bit, 8bit"):
        quantization_config("2bit", torch.float32)


def test_gora_s_mean_weight_gradient_refuses_quantised_weights(pair):
    from senslora.core.inits import mean_gradients

    q, _ = pair
    with pytest.raises(SensloraError, match="needs floating-point weights, and the model's are quantised"):
        mean_gradients(q, find_targets(q), _batches())


def test_prepare_model_for_kbit_training_first_changes_neither_the_ranks_nor_the_init(pair):
    """QLoRA recipes call PEFT's prepare_model_for_kbit_training (fp32 norms, input gradients,
    gradient checkpointing) before wrapping: allocating after it gives the same adapter."""
    from peft import LoraConfig, prepare_model_for_kbit_training

    q, _ = pair
    base = LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM")

    def adapter(model):
        alloc = allocate(model, _batches(), avg_rank=2, progress=False)
        peft_model = alloc.to_peft_model(model, base, batches=_batches())
        weights = {k: v.detach().clone() for k, v in peft_model.named_parameters() if "lora_" in k}
        peft_model.unload()
        return alloc.ranks, weights

    ranks, weights = adapter(q)
    prepared_ranks, prepared = adapter(prepare_model_for_kbit_training(q, use_gradient_checkpointing=True))
    assert prepared_ranks == ranks
    for key, value in weights.items():
        torch.testing.assert_close(prepared[key], value)


def test_a_gguf_file_is_quantised_for_qlora_too(tmp_path, capsys):
    """llama.cpp's files are dequantised on load (data/models.py), then quantised by bitsandbytes."""
    import json

    from tiny import write_tiny_llama_gguf

    from senslora.cli.main import main

    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "calib.txt").write_text("hello world\nthe cat sat on the mat\n" * 8)
    out = tmp_path / "alloc"
    args = ["allocate", "--model", str(tmp_path / "tiny.gguf"), "--calib", str(tmp_path / "calib.txt")]
    args += ["--calib-samples", "8", "--avg-rank", "2", "--no-plot", "--no-progress", "--quantize", "4bit"]
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    saved = json.loads((out / "allocation.json").read_text())
    assert saved["quantized"] == "4bit" and len(saved["matrices"]) == 14 and saved["init"] == "gradient"


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_new_task_head_stays_in_full_precision_on_a_quantised_encoder(tmp_path, bits):
    """A base checkpoint loaded under a classification head (as the MiniLM alias is): transformers
    would make the new head a quantised layer that is never quantised, failing at the first forward."""
    import bitsandbytes as bnb
    from conftest import make_word_tokenizer
    from transformers import BertConfig, BertModel

    from senslora.data.models import load_model

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=100, **DIMS)).save_pretrained(folder)  # token_batches draws ids < 100
    make_word_tokenizer().save_pretrained(folder)
    model, tok = load_model(folder, kind="classification", quantize=bits, device="cpu")
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.dtype == torch.float32
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    alloc = allocate(model, token_batches(2, batch_size=4, labels="class"), avg_rank=2, progress=False)
    assert alloc.quantized == bits and alloc.init == "gradient"
