"""The per-example calibration loss against HF's own losses and a manual computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_bert, tiny_llama, token_batches

from senslora.core.errors import SensloraError
from senslora.core.losses import model_inputs, move_batch, per_example_loss


def test_classification_mean_matches_hf_loss():
    model = tiny_bert()
    batch = token_batches(1, batch_size=5)[0]
    losses = per_example_loss(model, batch)
    assert losses.shape == (5,) and losses.requires_grad
    torch.testing.assert_close(losses.mean(), model(**batch).loss)


def test_regression_mean_matches_hf_loss():
    model = tiny_bert(num_labels=1)
    batch = token_batches(1, batch_size=4, labels=None)[0]
    batch["labels"] = torch.tensor([0.5, -1.0, 2.0, 0.0])
    losses = per_example_loss(model, batch)
    assert losses.shape == (4,)
    torch.testing.assert_close(losses.mean(), model(**batch).loss)


def test_causal_lm_matches_manual_computation_with_padding():
    model = tiny_llama()
    batch = token_batches(1, batch_size=4, labels="lm")[0]
    batch["labels"][3] = -100  # an example without any counted token gives 0
    losses = per_example_loss(model, batch)
    logits = model(**model_inputs(batch)).logits
    expected = []
    for n in range(4):
        # Token t predicts labels[t + 1]; only labels != -100 count.
        terms = [
            -F.log_softmax(logits[n, t], dim=-1)[batch["labels"][n, t + 1]]
            for t in range(logits.shape[1] - 1)
            if batch["labels"][n, t + 1] != -100
        ]
        expected.append(torch.stack(terms).mean() if terms else torch.tensor(0.0))
    torch.testing.assert_close(losses, torch.stack(expected))


def test_causal_lm_without_padding_matches_hf_loss():
    # With equally many counted tokens per example, the mean of per-example means is HF's token mean.
    model = tiny_llama()
    ids = torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    torch.testing.assert_close(per_example_loss(model, batch).mean(), model(**batch).loss)


class BareLinear(torch.nn.Linear):
    """A non-HF model that takes ``input_ids`` (here float features) and returns a bare tensor."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids)


def test_plain_module_returning_a_tensor():
    model = BareLinear(3, 2)
    batch = {"input_ids": torch.randn(4, 3), "labels": torch.tensor([0, 1, 1, 0])}
    expected = F.cross_entropy(model(batch["input_ids"]), batch["labels"], reduction="none")
    torch.testing.assert_close(per_example_loss(model, batch), expected)


def test_missing_labels_is_a_user_error():
    with pytest.raises(SensloraError, match="no 'labels'"):
        per_example_loss(tiny_bert(), token_batches(1, labels=None)[0])


def test_model_inputs_and_move_batch():
    batch = {
        "input_ids": torch.ones(2, 3),
        "attention_mask": torch.ones(2, 3),
        "labels": torch.ones(2),
        "idx": [0, 1],
    }
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask"}
    moved = move_batch(batch, "cpu")
    assert moved["idx"] == [0, 1] and moved["labels"].device.type == "cpu"
