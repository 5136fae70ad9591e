"""The allocate() API end to end on tiny models: budget, PEFT round trip, save/load, options."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_bert, tiny_llama, token_batches

from senslora.core.errors import SensloraError
from senslora.core.peft_bridge import peft_ranks
from senslora.core.pipeline import FIGURE3_SCORES, Allocation, allocate


@pytest.mark.parametrize("estimator", ["activation", "fisher", "fisher-batch", "hutchinson"])
def test_allocation_spends_exactly_the_budget_and_peft_builds_it(estimator):
    model = tiny_bert()
    alloc = allocate(model, token_batches(), avg_rank=3, estimator=estimator, progress=False)
    n = len(alloc.matrices)
    assert alloc.total_rank == 3 * n == sum(alloc.ranks.values())
    assert all(1 <= m.rank <= min(m.shape) for m in alloc.matrices)
    assert alloc.trainable_params == sum(m.rank * sum(m.shape) for m in alloc.matrices)
    assert alloc.uniform_params == 3 * sum(sum(m.shape) for m in alloc.matrices)
    for m in alloc.matrices:
        assert set(m.ranks_by_score) == set(FIGURE3_SCORES)
        assert m.ranks_by_score["fused"] == m.rank
        assert sum(mm.ranks_by_score["global"] for mm in alloc.matrices) == alloc.total_rank
    cfg = alloc.to_lora_config(LoraConfig(r=3, lora_alpha=6, task_type="SEQ_CLS"))
    assert peft_ranks(get_peft_model(tiny_bert(), cfg)) == alloc.ranks


def test_model_is_left_unchanged():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    allocate(model, token_batches(labels="lm"), estimator="fisher", progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_load_round_trip(tmp_path):
    alloc = allocate(tiny_bert(), token_batches(), avg_rank=2, progress=False)
    out = alloc.save(tmp_path / "a")
    assert sorted(p.name for p in out.iterdir()) == ["allocation.json", "lora_config", "ranks.png"]
    again = Allocation.load(out)
    assert json.loads(json.dumps(again.to_dict())) == json.loads(json.dumps(alloc.to_dict()))
    loaded = LoraConfig.from_pretrained(str(out / "lora_config"))
    assert peft_ranks(get_peft_model(tiny_bert(), loaded)) == alloc.ranks
    with pytest.raises(SensloraError, match="already exists"):
        alloc.save(out)


def test_corrupt_allocation_json_is_a_user_error(tmp_path):
    (tmp_path / "allocation.json").write_text("{not json")
    with pytest.raises(SensloraError, match="not a valid allocation.json"):
        Allocation.load(tmp_path)
    with pytest.raises(SensloraError, match="no allocation.json"):
        Allocation.load(tmp_path / "missing")


def test_same_inputs_same_ranks_and_scores():
    a = allocate(tiny_bert(), token_batches(), estimator="hutchinson", seed=3, progress=False)
    b = allocate(tiny_bert(), token_batches(), estimator="hutchinson", seed=3, progress=False)
    assert a.ranks == b.ranks
    assert [m.theta for m in a.matrices] == [m.theta for m in b.matrices]


def test_options_change_the_allocation_as_specified():
    batches = token_batches()
    model = tiny_bert(num_hidden_layers=3)
    sra = allocate(model, batches, avg_rank=4, progress=False)
    pra = allocate(model, batches, avg_rank=4, strategy="pra", progress=False)
    assert pra.total_rank == sra.total_rank
    assert set(pra.ranks.values()) <= {3, 4, 5}  # 3 categories around the average 4
    params = allocate(model, batches, avg_rank=4, budget_mode="params", progress=False)
    assert params.trainable_params <= params.uniform_params
    glob = allocate(model, batches, avg_rank=4, score="global", progress=False)
    assert glob.weights == {"beta1": 0.0, "beta2": 0.0, "gamma1": 1.0, "gamma2": 0.0}
    assert [m.rank for m in glob.matrices] == [m.ranks_by_score["global"] for m in sra.matrices]
    dropped = allocate(model, batches, avg_rank=1, r_min=0, progress=False)
    assert any(r == 0 for r in dropped.ranks.values())
    cfg = dropped.to_lora_config()
    assert len(cfg.target_modules) == sum(r > 0 for r in dropped.ranks.values())


def test_layers_restrict_the_budget_to_kept_blocks():
    alloc = allocate(
        tiny_bert(num_hidden_layers=4), token_batches(), avg_rank=2, layers=[1, 3], progress=False
    )
    assert {m.layer for m in alloc.matrices} == {1, 3}
    assert alloc.total_rank == 2 * len(alloc.matrices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"estimator": "nope"}, "--estimator must be one of"),
        ({"score": "nope"}, "--score must be one of"),
        ({"avg_rank": 0.5, "r_min": 1}, "below --r-min"),
        ({"avg_rank": 40}, "above the largest rank"),
        ({"target_modules": "no_such_module"}, "no target matrix"),
        ({"topk_fraction": 1.5}, "--topk-fraction"),
        ({"alpha": 0}, "--alpha"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(SensloraError, match=message):
        allocate(tiny_bert(), token_batches(), progress=False, **kwargs)


def test_empty_calibration_and_non_finite_diagonal():
    with pytest.raises(SensloraError, match="empty"):
        allocate(tiny_bert(), [], progress=False)
    model = tiny_bert()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[5:] = float("nan")
    with pytest.raises(SensloraError, match="non-finite"):
        allocate(model, token_batches(), progress=False)


def test_activation_never_materialises_dense_diagonals(monkeypatch):
    from senslora.core.diagonal import Diagonal

    def forbidden(self):
        raise AssertionError("dense() called")

    monkeypatch.setattr(Diagonal, "dense", forbidden)
    alloc = allocate(tiny_bert(), token_batches(), progress=False)
    assert np.isfinite([m.theta for m in alloc.matrices]).all()
