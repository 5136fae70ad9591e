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

    from senslora.models import resolve_model_path

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
