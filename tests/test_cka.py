"""Layer-wise CKA: the CKA formula, token choice, block selection and the saved record."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import tiny_bert, tiny_llama, token_batches

from senslora.core.errors import SensloraError
from senslora.training.cka import (
    LayerSelection,
    _is_decoder,
    collect_block_representations,
    layer_cka,
    linear_cka,
    select_layers,
    select_layers_by_cka,
)


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Reference: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with n x n Gram matrices and H."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_cka_of_x_with_itself_is_one():
    x = _rand(50, 7)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    x, y = _rand(60, 8, seed=1).double(), _rand(60, 5, seed=2).double()
    y = y + 0.5 * x[:, :5]  # related, so the CKA is not trivial
    q, _ = torch.linalg.qr(_rand(8, 8, seed=3).double())  # random orthogonal matrix
    base = linear_cka(x, y)
    assert 0.05 < base < 0.99
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x @ q, x) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    # A constant offset is removed by centring.
    assert linear_cka(x + 5.0, y) == pytest.approx(base, abs=1e-10)


def test_cka_of_independent_data_is_near_zero():
    x, y = _rand(5000, 10, seed=4), _rand(5000, 10, seed=5)
    assert linear_cka(x, y) < 0.05


@pytest.mark.parametrize(("n", "d1", "d2"), [(40, 6, 9), (12, 30, 25)])  # feature form, then Gram form
def test_cka_matches_hsic_reference(n, d1, d2):
    x = _rand(n, d1, seed=6)
    y = x[:, :1] @ _rand(1, d2, seed=7) + _rand(n, d2, seed=8)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), abs=1e-10)


def test_cka_constant_representation_gives_zero_and_shape_errors():
    assert linear_cka(torch.ones(10, 3), _rand(10, 4)) == 0.0
    with pytest.raises(ValueError):
        linear_cka(_rand(10, 3), _rand(9, 3))
    with pytest.raises(ValueError):
        linear_cka(_rand(10), _rand(10, 3))


# ------------------------------------------------------------------------- token choice
def _hidden(model, batch):
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states


def _left_pad(batch):
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for r in range(ids.shape[0]):
        shift = int((mask[r] == 0).sum())
        ids[r], mask[r] = ids[r].roll(shift), mask[r].roll(shift)
    return {"input_ids": ids, "attention_mask": mask}


def test_encoder_uses_first_token():
    model = tiny_bert()
    batches = token_batches(2, batch_size=3, seed=1)
    assert not _is_decoder(model)
    model.train()
    reps = collect_block_representations(model, batches, progress=False)
    assert model.training  # mode restored
    assert len(reps) == 3 and reps[0].shape == (6, 16) and reps[0].dtype == torch.float32
    model.eval()
    for i in range(3):
        expect = torch.cat([_hidden(model, b)[i][:, 0] for b in batches])
        torch.testing.assert_close(reps[i], expect)


@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_uses_last_non_pad_token(side):
    model = tiny_llama()
    batches = token_batches(2, batch_size=4, seed=2, labels=None)
    if side == "left":
        batches = [_left_pad(b) for b in batches]
    assert _is_decoder(model)
    reps = collect_block_representations(model, batches, progress=False)
    for i in range(3):
        rows = []
        for b in batches:
            h = _hidden(model, b)[i]
            for r in range(h.shape[0]):
                last = int(torch.nonzero(b["attention_mask"][r]).max())
                if side == "right":
                    assert last == int(b["attention_mask"][r].sum()) - 1
                else:
                    assert last == h.shape[1] - 1
                rows.append(h[r, last])
        torch.testing.assert_close(reps[i], torch.stack(rows))
    # Left and right padding give the same representations (same tokens, causal attention).
    if side == "left":
        right = collect_block_representations(
            model, token_batches(2, batch_size=4, seed=2, labels=None), progress=False
        )
        for a, b in zip(reps, right, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_decoder_with_classification_head_counts_as_decoder():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2
    )
    assert _is_decoder(LlamaForSequenceClassification(cfg))


def test_token_override_and_bad_choice():
    model = tiny_llama()
    batches = token_batches(1, batch_size=3, seed=3, labels=None)
    first = collect_block_representations(model, batches, progress=False, token="first")
    torch.testing.assert_close(first[1], _hidden(model, batches[0])[1][:, 0])
    with pytest.raises(SensloraError, match="token"):
        collect_block_representations(model, batches, progress=False, token="middle")


class _NoHidden(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return {"logits": self.lin(torch.zeros(input_ids.shape[0], 4))}


def test_model_without_hidden_states_is_a_user_error():
    with pytest.raises(SensloraError, match="does not return hidden states"):
        collect_block_representations(_NoHidden(), token_batches(1), progress=False, token="first")


def test_layer_cka_values():
    model = tiny_llama(num_hidden_layers=3)
    scores = layer_cka(model, token_batches(2, batch_size=4, labels=None), progress=False)
    assert len(scores) == 3
    assert all(0.0 <= s <= 1.0 + 1e-9 for s in scores)


def test_layer_cka_needs_two_examples():
    with pytest.raises(SensloraError, match="at least 2"):
        layer_cka(tiny_bert(), token_batches(1, batch_size=1), progress=False)


# ------------------------------------------------------------------------------ selection
def test_select_layers_lowest_cka():
    assert select_layers([0.9, 0.1, 0.5, 0.3]) == [1, 3]
    assert select_layers([0.9, 0.1, 0.5, 0.3], 0.25) == [1]
    assert select_layers([0.9, 0.1, 0.5, 0.3], 1.0) == [0, 1, 2, 3]
    assert select_layers([0.9, 0.1, 0.5, 0.3, 0.2], 0.5) == [1, 4]  # floor(2.5) = 2
    assert select_layers([0.2, 0.9, 0.2, 0.2], 0.5) == [0, 2]  # ties by index
    assert select_layers([0.1] * 10, 0.3) == [0, 1, 2]  # 0.3 * 10 floors to 3, not 2
    assert select_layers([0.9, 0.1, 0.5, 0.3], 0.5, skip_lowest=1) == [2, 3]


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, math.nan, "half"])
def test_select_layers_bad_ratio(ratio):
    with pytest.raises(SensloraError, match="layer-ratio"):
        select_layers([0.5, 0.4], ratio)


def test_select_layers_keeps_zero():
    with pytest.raises(SensloraError, match=r"--layer-ratio 0.2 keeps 0 of 4 blocks; raise it"):
        select_layers([0.5, 0.4, 0.3, 0.2], 0.2)


def test_select_layers_by_cka_and_save(tmp_path):
    model = tiny_llama(num_hidden_layers=4)
    batches = token_batches(2, batch_size=4, labels=None)
    sel = select_layers_by_cka(model, batches, 0.5, progress=False)
    assert len(sel.cka) == 4 and len(sel.kept) == 2 and sel.n_examples == 8 and sel.token == "last"
    assert sel.kept == select_layers(sel.cka, 0.5)
    assert {"forward", "hidden_states", "cka"} <= set(sel.timings)
    out = sel.save(tmp_path / "cka")
    data = json.loads((out / "cka.json").read_text())
    assert data["kept"] == sel.kept and data["num_blocks"] == 4 and data["ratio"] == 0.5
    assert (out / "cka.png").stat().st_size > 0
    assert LayerSelection.load(out) == sel
    with pytest.raises(SensloraError, match="already exists"):
        sel.save(out)
    sel.save(out, overwrite=True)


def test_select_layers_by_cka_checks_ratio_before_work():
    with pytest.raises(SensloraError, match="layer-ratio"):
        select_layers_by_cka(_NoHidden(), token_batches(1), 2.0, progress=False)


def test_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    sel = LayerSelection(cka=[0.5, 0.2], kept=[1], ratio=0.5, n_examples=4, timings={})

    def boom(self, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(LayerSelection, "plot", boom)
    with pytest.raises(RuntimeError):
        sel.save(tmp_path / "cka")
    assert list(tmp_path.iterdir()) == []
