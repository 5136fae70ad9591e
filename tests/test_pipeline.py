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


# ------------------------------------------------------------------- AllocationConfig (issue 12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "fancy"}, "unknown --preset 'fancy'"),
        ({"estimator": "nope"}, "--estimator must be one of .*got 'nope'"),
        ({"rho": 0.5}, "--rho must be .*got 0.5"),
        ({"estimator": "fisher", "sink": "drop"}, "--sink drop"),
        ({"budget_mode": "tokens"}, "unknown budget mode 'tokens'"),
        ({"alpha_mode": "nope"}, "unknown alpha mode 'nope'"),
        ({"r_min": -1}, "--r-min must be an integer >= 0, got -1"),
        ({"categories": 0}, "--categories must be an integer >= 1, got 0"),
        ({"num_probes": 0}, "--num-probes must be an integer >= 1, got 0"),
        ({"num_probes": 1.5}, "--num-probes must be an integer >= 1, got 1.5"),
        ({"avg_rank": float("nan")}, "--avg-rank must be a number > 0, got nan"),
        ({"r_max": 0}, "--r-max 0 is below --r-min 1"),
        ({"avg_rank": 2, "r_min": 3}, "--avg-rank 2 is below --r-min 3"),
    ],
)
def test_allocation_config_names_the_first_bad_value(kwargs, message):
    from senslora import AllocationConfig

    with pytest.raises(SensloraError, match=message) as err:
        AllocationConfig(**kwargs)
    assert "\n" not in str(err.value)
    config = AllocationConfig()
    for key, value in kwargs.items():
        setattr(config, key, value)
    with pytest.raises(SensloraError, match=message):
        config.validate()  # also after changing a valid config


def test_allocation_config_fields_are_allocate_keywords_with_its_defaults_and_flag_help():
    import dataclasses
    import inspect

    from senslora.cli.flags import allocator_flags
    from senslora.core.config import AllocationConfig
    from senslora.core.presets import preset_init

    keyword = inspect.signature(allocate).parameters
    fields = {f.name: f for f in dataclasses.fields(AllocationConfig)}
    assert {name: keyword[name].default for name in fields} == {n: f.default for n, f in fields.items()}
    # init None is the preset's init, filled in when the config is made
    assert fields["init"].default is None and AllocationConfig().init == preset_init(None)
    assert AllocationConfig().to_dict() == {**{n: f.default for n, f in fields.items()}, "init": preset_init(None)}
    assert all(f.metadata["help"] for f in fields.values())
    flags = {{"budget": "budget_mode"}.get(flag.dest, flag.dest): flag for flag in allocator_flags()}
    shared = set(flags) & set(fields)
    assert len(shared) >= 20
    for name in shared:  # the flag may add its default
        assert flags[name].help.startswith(fields[name].metadata["help"]), name


@pytest.mark.parametrize(
    "kwargs",
    [
        {"avg_rank": 3},
        {"avg_rank": 4, "strategy": "pra", "preset": "paper"},
        {"avg_rank": 2, "budget_mode": "params", "normalize": "role", "temperature": 0.5, "rho": 2},
        {"estimator": "hutchinson", "seed": 3, "num_probes": 2, "r_min": 0, "layers": [0]},
    ],
)
def test_config_gives_the_same_allocation_as_the_keywords(kwargs):
    from senslora.core.config import AllocationConfig

    batches = token_batches()
    by_keyword = allocate(tiny_bert(), batches, progress=False, **kwargs)
    config = AllocationConfig(**kwargs)
    by_config = allocate(tiny_bert(), batches, config=config, progress=False)
    # A keyword that agrees with the config is allowed.
    agreeing = allocate(tiny_bert(), batches, config=config, progress=False, **kwargs)
    assert config.to_dict() == AllocationConfig(**kwargs).to_dict()  # allocate does not change it
    for alloc in (by_config, agreeing):
        assert alloc.ranks == by_keyword.ranks
        a, b = alloc.to_dict(), by_keyword.to_dict()
        for d in (a, b):
            del d["timings"], d["versions"]
        assert a == b


def test_config_and_a_conflicting_keyword_is_a_one_line_error():
    from senslora.core.config import AllocationConfig

    with pytest.raises(SensloraError, match=r"avg_rank=3 and the keyword avg_rank=5") as err:
        allocate(
            tiny_bert(), token_batches(), config=AllocationConfig(avg_rank=3), avg_rank=5, progress=False
        )
    assert "\n" not in str(err.value)
    with pytest.raises(SensloraError, match="estimator"):
        allocate(
            tiny_bert(), token_batches(), config=AllocationConfig(estimator="fisher"), estimator="activation"
        )


def test_a_keyword_that_agrees_with_the_config_is_no_conflict_whatever_its_sequence_type():
    from senslora.core.config import AllocationConfig
    from senslora.core.pipeline import _config_from

    config = AllocationConfig(avg_rank=3, target_modules=("query", "value"))
    got = _config_from(config, {"avg_rank": 3, "target_modules": ["query", "value"]})
    assert got == config and got is not config
    with pytest.raises(SensloraError, match="target_modules"):
        _config_from(config, {"target_modules": ["query"]})
