"""Tiny in-code models shared by the tests (random weights, no downloads)."""

from __future__ import annotations

import torch


def tiny_bert(num_labels: int = 2, seed: int = 0, **overrides):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg.update(overrides)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def token_batches(
    n_batches: int = 3, batch_size: int = 4, seq: int = 10, *, seed: int = 0, labels: str | None = "class"
):
    """Padded random batches; ``labels`` = "class" (2 classes), "lm" or None."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 100, (batch_size, seq), generator=g)
        lengths = torch.randint(3, seq + 1, (batch_size,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask
        b = {"input_ids": ids, "attention_mask": mask}
        if labels == "class":
            b["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
        elif labels == "lm":
            b["labels"] = ids.masked_fill(mask == 0, -100)
        out.append(b)
    return out


def save_tiny_bert_with_minilm_tokenizer(folder, **overrides):
    """A tiny random BERT classifier saved as an HF folder with the real MiniLM tokenizer."""
    from transformers import AutoTokenizer

    from senslora.data.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tiny_bert(vocab_size=tok.vocab_size, **overrides).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_sentiment_csv(path, n: int = 60, seed: int = 0) -> None:
    """``n`` rows of text,label with word-level sentiment ("good"/"great" vs "bad"/"awful")."""
    import csv
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for _ in range(n):
            positive = rng.random() < 0.5
            word = rng.choice(["good", "great"] if positive else ["bad", "awful"])
            filler = " ".join(rng.choice(["very", "not", "one", "two"]) for _ in range(rng.randint(0, 3)))
            writer.writerow([f"the film is {word} {filler}".strip(), "pos" if positive else "neg"])


def _llama_cpp_permute(weight, n_head: int):
    """llama.cpp's row order for q/k projections (transformers undoes it when reading a GGUF)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# HF LLaMA parameter name (per block) -> llama.cpp tensor name.
_GGUF_BLOCK_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_tiny_llama_gguf(path, *, architecture: str = "llama", raw_type=None, seed: int = 0):
    """Write a tiny 2-block LLaMA (hidden 16, vocabulary of the 256 bytes, ``<s>``, ``</s>`` and two merges) as an F32
    GGUF file with a byte-level BPE tokenizer in its metadata, as llama.cpp's converter lays it out.

    Returns the HF model it was written from (its weights are what transformers reads back).
    ``raw_type`` (a ``gguf.GGMLQuantizationType``) stores the first block's q projection as raw bytes
    of that type instead; ``architecture`` overrides ``general.architecture``.
    """
    import gguf
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    heads, layers = 2, 2
    config = LlamaConfig(
        vocab_size=260,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_block_count(layers)
    w.add_feed_forward_length(32)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([*bytes_to_unicode().values(), "<s>", "</s>", "Ġt", "Ġth"])
    w.add_token_types([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * 2)
    w.add_token_merges(["Ġ t", "Ġt h"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(layers):
        for hf, cpp in _GGUF_BLOCK_NAMES.items():
            weight = sd[f"model.layers.{i}.{hf}"]
            if cpp in ("attn_q.weight", "attn_k.weight"):
                weight = _llama_cpp_permute(weight, heads)
            if raw_type is not None and i == 0 and cpp == "attn_q.weight":
                block, size = gguf.GGML_QUANT_SIZES[raw_type]
                raw = np.zeros((weight.shape[0], weight.shape[1] // block * size), dtype=np.uint8)
                w.add_tensor(f"blk.{i}.{cpp}", raw, raw_shape=weight.shape, raw_dtype=raw_type)
                continue
            w.add_tensor(f"blk.{i}.{cpp}", weight)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def layer_inputs(model, batches, module) -> list:
    """Each batch's input of ``module`` (float64), from one plain forward pass per batch."""
    from senslora.core.losses import model_inputs

    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().double()))
    try:
        with torch.no_grad():
            for b in batches:
                model(**model_inputs(b))
    finally:
        handle.remove()
    return seen


def save_tiny_chat_llama(folder, tokenizer, seed: int = 0):
    """A tiny random LLaMA saved as an HF folder with ``tokenizer`` (e.g. the tests' word-level one
    with a chat template), its vocabulary sized to the tokenizer's."""
    tiny_llama(seed=seed, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
