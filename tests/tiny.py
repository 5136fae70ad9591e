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
