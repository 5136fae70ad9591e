"""The decoder and encoder families our users fine-tune, as tiny random models of transformers' own
classes: the default allocation (activation statistics, the gradient init) finds the linear layers each family
names, PEFT builds every matrix at its allocated rank, and the initialised adapter runs. Mixture-of-
experts routers are never targets; transformers 5 keeps the routed experts as fused 3-D parameters,
which are not linear layers (attention and any shared expert are targeted)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from tiny import token_batches

from senslora.core.peft_bridge import peft_ranks
from senslora.core.pipeline import allocate

COMMON = dict(
    vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
)  # fmt: skip
LLAMA_LIKE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]
# family -> (config class, model class, config overrides, the linear layers targeted in each block)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, LLAMA_LIKE),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    "phi": ("PhiConfig", "PhiForCausalLM", {}, ["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"]),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}, LLAMA_LIKE),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}, LLAMA_LIKE),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}, LLAMA_LIKE),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}, LLAMA_LIKE),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, LLAMA_LIKE),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 2, "num_experts_per_tok": 1}, ATTENTION),
    "qwen2-moe": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
        LLAMA_LIKE,  # attention and the shared expert; not its one-output shared_expert_gate router
    ),  # fmt: skip
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_default_allocation_and_init_run_on_each_decoder_family(family):
    from peft import LoraConfig

    config_class, model_class, overrides, names = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**COMMON, **overrides})).eval()
    batches = token_batches(3, batch_size=4, labels="lm")
    alloc = allocate(model, batches, avg_rank=2, progress=False)
    assert (alloc.init, alloc.init_fallback) == ("gradient", "")
    assert sorted({name.rpartition(".")[2] for name in alloc.ranks}) == names
    assert len(alloc.ranks) == 2 * len(names)  # every block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on tiny configs
        peft_model = alloc.to_peft_model(model, LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM"), batches=batches)
        loss = peft_model(**batches[0]).loss
    assert peft_ranks(peft_model) == alloc.ranks
    assert torch.isfinite(loss)
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)  # initialised


ENC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
BERT_LIKE = ["dense", "key", "query", "value"]
ENCODERS = {
    "bert": ("BertConfig", "BertForSequenceClassification", ENC, BERT_LIKE),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {**ENC, "max_position_embeddings": 80}, BERT_LIKE),
    "xlm-roberta": (
        "XLMRobertaConfig", "XLMRobertaForSequenceClassification", {**ENC, "max_position_embeddings": 80}, BERT_LIKE,
    ),  # fmt: skip
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {**ENC, "embedding_size": 32}, BERT_LIKE),
    "distilbert": (
        "DistilBertConfig", "DistilBertForSequenceClassification", dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4),
        ["k_lin", "lin1", "lin2", "out_lin", "q_lin", "v_lin"],
    ),  # fmt: skip
    "deberta-v2": (
        "DebertaV2Config", "DebertaV2ForSequenceClassification", ENC, ["dense", "key_proj", "query_proj", "value_proj"],
    ),  # fmt: skip
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification", ENC, ["Wi", "Wo", "Wqkv"]),
}


@pytest.mark.parametrize("family", list(ENCODERS))
def test_the_default_allocation_and_init_run_on_each_encoder_classifier(family):
    from peft import LoraConfig

    config_class, model_class, overrides, names = ENCODERS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=100, num_labels=2, pad_token_id=0, **overrides)
    model = getattr(transformers, model_class)(config).eval()
    batches = token_batches(3, batch_size=4, labels="class")
    alloc = allocate(model, batches, avg_rank=2, progress=False)
    assert (alloc.init, alloc.init_fallback) == ("gradient", "")
    assert sorted({name.rpartition(".")[2] for name in alloc.ranks}) == names
    assert not any("classifier" in name for name in alloc.ranks)  # never the task head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = alloc.to_peft_model(model, LoraConfig(r=2, lora_alpha=4, task_type="SEQ_CLS"), batches=batches)
        loss = peft_model(**batches[0]).loss
    assert peft_ranks(peft_model) == alloc.ranks and torch.isfinite(loss)
