"""Adapter initialisations (issue 26): the gradient sketch, the least-squares B, every --init on
tiny models, the saved adapter, and the bad inputs."""

import json

import pytest
import torch
from tiny import tiny_bert, tiny_llama, token_batches

from senslora.core.config import AllocationConfig
from senslora.core.errors import SensloraError
from senslora.core.estimators.fisher import FisherEstimator
from senslora.core.inits import (
    INITS,
    MUTATES_BASE,
    gradient_sketch,
    init_peft_model,
    mean_gradients,
    save_converted,
)
from senslora.core.peft_bridge import peft_ranks
from senslora.core.pipeline import Allocation, allocate
from senslora.core.presets import preset_init
from senslora.core.sketch import GradientSketch, draw_a, gradient_factors, least_squares_b
from senslora.core.targets import find_targets

MODELS = {"llama": (tiny_llama, "lm", "CAUSAL_LM"), "bert": (tiny_bert, "class", "SEQ_CLS")}


def _base_config(task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=4, task_type=task_type)


def test_draw_a_rows_are_a_prefix_and_seeded():
    a8 = draw_a("model.layers.0.q_proj", 8, 16, seed=3)
    assert torch.equal(draw_a("model.layers.0.q_proj", 3, 16, seed=3), a8[:3])
    assert not torch.equal(draw_a("model.layers.0.q_proj", 8, 16, seed=4), a8)
    assert not torch.equal(draw_a("model.layers.0.k_proj", 8, 16, seed=3), a8)
    assert float(a8.abs().max()) <= 1 / 16**0.5  # PEFT's Kaiming-uniform bound for lora_A


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("shared", [False, True], ids=["batched-pass", "fisher-pass"])
def test_sketch_equals_explicit_gradient_times_a_transpose(model_name, shared):
    make, labels, _ = MODELS[model_name]
    model, batches = make(), token_batches(labels=labels)
    targets = find_targets(model)
    ranks = {t.name: 1 + i % 3 for i, t in enumerate(targets)}
    grads = mean_gradients(model, targets, batches)  # explicit G from autograd
    if shared:  # accumulated in the fisher estimator's per-example hooks
        sketch = GradientSketch({t.name: (*t.shape, ranks[t.name]) for t in targets}, seed=1)
        fisher = FisherEstimator(sketch=sketch)
        fisher.estimate(model, batches, targets, progress=False)
        sketch.num_examples = fisher.num_examples
    else:  # one batched forward and backward
        sketch = gradient_sketch(model, batches, targets, ranks, seed=1)
    means = sketch.mean(sketch.num_examples)
    for t in targets:
        expected = grads[t.name] @ draw_a(t.name, ranks[t.name], t.shape[1], seed=1).T
        assert float(expected.abs().max()) > 0
        torch.testing.assert_close(means[t.name], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_least_squares_b_reproduces_the_gradient_at_full_rank_and_its_projection_below():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(5, 6, generator=g)
    a = draw_a("w", 6, 6, seed=0)
    torch.testing.assert_close(least_squares_b(grad @ a.T, a) @ a, grad, rtol=1e-4, atol=1e-5)
    a2 = a[:2]
    proj = least_squares_b(grad @ a2.T, a2) @ a2
    # The residual is orthogonal to A's rows: the least-squares projection onto them.
    torch.testing.assert_close((grad - proj) @ a2.T, torch.zeros(5, 2), atol=1e-5, rtol=0)


def test_gradient_factors_give_a_normalised_step_against_the_gradient():
    g = torch.Generator().manual_seed(1)
    grads = {"a": torch.randn(4, 6, generator=g), "b": 10 * torch.randn(3, 6, generator=g)}
    a_full = {n: draw_a(n, 3, 6, seed=0) for n in grads}
    sketches = {n: grads[n] @ a_full[n].T for n in grads}
    factors = gradient_factors(sketches, a_full, {"a": 2, "b": 3}, {"a": 2.0, "b": 0.5}, step=1e-3)
    updates = {n: s * (factors[n][1] @ factors[n][0]) for n, s in {"a": 2.0, "b": 0.5}.items()}
    entries = torch.cat([u.reshape(-1) for u in updates.values()])
    assert float(entries.square().mean().sqrt()) == pytest.approx(1e-3, rel=1e-4)
    for n, u in updates.items():
        assert float((u * grads[n]).sum()) < 0  # a descent direction
    # Relative sizes between matrices are the projected gradients': "b" moves more.
    assert float(updates["b"].abs().mean()) > float(updates["a"].abs().mean())


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("init", INITS)
def test_every_init_builds_the_allocated_ranks_and_trains_one_step(model_name, init):
    make, labels, task_type = MODELS[model_name]
    torch.manual_seed(0)
    model, batches = make(), token_batches(labels=labels)
    alloc = allocate(model, batches, avg_rank=2, budget_mode="params", init=init, progress=False)
    record: dict = {}
    peft_model = alloc.to_peft_model(model, _base_config(task_type), batches=batches, record=record)
    assert record["init"] == init
    assert peft_ranks(peft_model) == {n: r for n, r in alloc.ranks.items() if r > 0}
    b_norm = sum(float(p.detach().abs().sum()) for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert (b_norm == 0) == (init in ("zero", "eva"))
    from senslora.core.losses import per_example_loss

    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    loss = per_example_loss(peft_model, batches[0]).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in peft_model.named_parameters() if "lora_" in n)


def test_gradient_init_is_deterministic_per_seed_and_the_first_step_lowers_the_loss():
    from senslora.core.losses import per_example_loss

    def factors(seed):
        model, batches = tiny_llama(), token_batches(labels="lm")
        alloc = allocate(model, batches, avg_rank=2, init="gradient", init_step=0.02, seed=seed, progress=False)
        peft_model = alloc.to_peft_model(model, _base_config("CAUSAL_LM"))
        with torch.no_grad():
            loss = float(per_example_loss(peft_model, batches[0]).mean())
            with peft_model.disable_adapter():
                base_loss = float(per_example_loss(peft_model, batches[0]).mean())
        return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}, loss, base_loss

    first, loss, base_loss = factors(0)
    again, _, _ = factors(0)
    other, _, _ = factors(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    assert loss < base_loss  # the initial update is a step down the calibration loss


def test_fisher_shares_its_pass_when_ranks_are_capped_else_one_more_pass():
    model, batches = tiny_bert(), token_batches()
    shared = allocate(model, batches, estimator="fisher", init="gradient", progress=False)  # robust: rho = 2
    assert shared.init_pass == "shared" and "init" not in shared.timings
    extra = allocate(model, batches, estimator="fisher", rho=0, init="gradient", progress=False)
    assert extra.init_pass == "extra" and extra.timings["init"] > 0
    assert allocate(model, batches, init="gradient", progress=False).init_pass == "extra"  # activation
    # Whichever pass filled it, the factors at the same ranks are the same.
    cfg = _base_config("SEQ_CLS")
    one = shared.to_peft_model(tiny_bert(), cfg)
    two = allocate(
        tiny_bert(), batches, estimator="fisher", init="gradient", progress=False
    ).to_peft_model(tiny_bert(), cfg)
    assert all(torch.equal(p, q) for p, q in zip(one.parameters(), two.parameters(), strict=True))


def test_zero_init_is_exactly_the_plain_peft_adapter():
    from senslora.training.methods.base import wrap_peft

    model, batches = tiny_bert(), token_batches()
    alloc = allocate(model, batches, avg_rank=2, init="zero", progress=False)
    torch.manual_seed(5)
    plain = wrap_peft(tiny_bert(), alloc.to_lora_config(_base_config("SEQ_CLS")))
    torch.manual_seed(5)
    ours = alloc.to_peft_model(tiny_bert(), _base_config("SEQ_CLS"))
    assert alloc.init == "zero" and json.loads(json.dumps(alloc.to_dict()))["init"] == "zero"
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), ours.parameters(), strict=True))


@pytest.mark.parametrize("init", MUTATES_BASE)
def test_a_base_changing_init_saves_a_plain_adapter_for_the_original_model(tmp_path, init):
    from peft import PeftModel

    from senslora.core.inits import save_initial_adapter

    model, batches = tiny_bert(), token_batches()
    alloc = allocate(model, batches, avg_rank=2, init=init, progress=False)
    peft_model = alloc.to_peft_model(model, _base_config("SEQ_CLS"), batches=batches)
    save_initial_adapter(peft_model, tmp_path / "initial")
    with torch.no_grad():  # "training": move every LoRA factor and the head
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_converted(peft_model, tmp_path / "out", tmp_path / "initial")
    peft_model.eval()
    reloaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "out")).eval()
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, peft_model(**batch).logits, rtol=1e-4, atol=1e-5)


def test_the_presets_own_init_falls_back_to_zero_where_it_cannot_run_and_says_why():
    # robust's init is gradient; on unlabelled batches or an offloaded model it cannot run: the
    # allocation warns, uses PEFT's zero init and records why (a given --init is an error instead).
    assert preset_init("robust") == "gradient" and preset_init("paper") == "zero"
    labelled = allocate(tiny_bert(), token_batches(), avg_rank=2, progress=False)
    assert (labelled.init, labelled.init_fallback, labelled.init_pass) == ("gradient", "", "extra")
    offload = tiny_bert()
    offload.hf_device_map = {"bert.embeddings": "cpu", "bert.encoder": "disk"}
    for model, batches, why in [
        (tiny_bert(), token_batches(labels=None), "the calibration batches have no labels"),
        (offload, token_batches(), "the model has offloaded"),
    ]:
        with pytest.warns(UserWarning, match=f"robust preset's --init gradient cannot run: {why}.*--init zero"):
            alloc = allocate(model, batches, avg_rank=2, progress=False)
        assert alloc.init == "zero" and alloc.init_fallback.startswith(why) and alloc.init_pass == ""
        saved = Allocation.from_dict(json.loads(json.dumps(alloc.to_dict())))
        assert saved.init == "zero" and saved.init_fallback == alloc.init_fallback
        assert alloc.ranks == labelled.ranks  # the init never changes the ranks
    config = AllocationConfig(avg_rank=2)
    assert config.init == "gradient" and config.init_from_preset
    with pytest.warns(UserWarning, match="cannot run"):
        assert allocate(tiny_bert(), token_batches(labels=None), config=config, progress=False).init == "zero"
    with pytest.raises(SensloraError, match="--init gradient cannot run"):  # named: never replaced
        allocate(tiny_bert(), token_batches(labels=None), config=AllocationConfig(avg_rank=2, init="gradient"), progress=False)
    config.init = "lora-ga"  # set on the config after it was made: the caller's, not the preset's
    with pytest.raises(SensloraError, match="--init lora-ga cannot run"):
        allocate(tiny_bert(), token_batches(labels=None), config=config, progress=False)


def test_bad_inits_are_one_line_errors():
    model, batches = tiny_bert(), token_batches()
    with pytest.raises(SensloraError, match="unknown --init 'svd'"):
        allocate(model, batches, init="svd", progress=False)
    with pytest.raises(SensloraError, match="--preset paper .* --init gradient"):
        allocate(model, batches, preset="paper", init="gradient", progress=False)
    with pytest.raises(SensloraError, match="init-step must be a positive"):
        allocate(model, batches, init="gradient", init_step=0, progress=False)
    with pytest.raises(SensloraError, match="--init gradient cannot run: the calibration batches have no labels"):
        allocate(model, token_batches(labels=None), init="gradient", progress=False)
    model.hf_device_map = {"bert.embeddings": "cpu", "bert.encoder": "disk"}  # accelerate's offload record
    for init in ("gradient", "pissa", "eva"):  # a backward pass, or the weights, offloaded blocks lack
        with pytest.raises(SensloraError, match=f"--init {init} cannot run: the model has offloaded"):
            allocate(model, batches, init=init, progress=False)
    assert allocate(model, batches, init="zero", progress=False).init == "zero"
    alloc = allocate(tiny_bert(), batches, init="corda", progress=False)
    with pytest.raises(SensloraError, match="--init corda needs calibration batches"):
        alloc.to_peft_model(tiny_bert(), _base_config("SEQ_CLS"))


def test_init_peft_model_refuses_offloaded_weights():
    from peft import LoraConfig

    model = tiny_bert()
    target = find_targets(model)[0]
    target.module.weight = torch.nn.Parameter(torch.empty(target.shape, device="meta"))
    with pytest.raises(SensloraError, match="offloaded"):
        init_peft_model(model, LoraConfig(r=2, target_modules=[target.name]), "pissa")


def test_cli_allocate_init_gradient_writes_an_adapter_peft_loads_trainable(tmp_path):
    from conftest import make_word_tokenizer
    from peft import PeftModel
    from safetensors.torch import load_file

    from senslora.cli.main import main

    tiny_bert().save_pretrained(tmp_path / "bert")
    make_word_tokenizer().save_pretrained(tmp_path / "bert")
    (tmp_path / "s.csv").write_text("text,label\n" + "".join(f"{w} film {i},{int(w == 'good')}\n" for i in range(16) for w in ("good", "bad")))
    out = tmp_path / "alloc"
    args = ["allocate", "--model", str(tmp_path / "bert"), "--calib", str(tmp_path / "s.csv"), "--label-column", "label",
            "--calib-samples", "16", "--max-length", "16", "--avg-rank", "2", "--no-progress", "--no-plot"]  # fmt: skip
    assert main([*args, "--init", "gradient", "--out", str(out)]) == 0
    record = json.loads((out / "allocation.json").read_text())
    assert record["init"] == "gradient" and record["init_pass"] == "extra" and "sketch" not in record
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)
    loaded = PeftModel.from_pretrained(tiny_bert(), str(out / "adapter"), is_trainable=True)
    assert peft_ranks(loaded) == {k: v for k, v in record_ranks(record).items() if v > 0}
    assert all(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    # Bad input: one line, exit 2, nothing written.
    assert main([*args, "--init", "gradient", "--preset", "paper", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def record_ranks(record: dict) -> dict[str, int]:
    return {m["name"]: m["rank"] for m in record["matrices"]}


def test_the_sketch_holds_only_its_accumulators():
    # Memory of the init: d_out x k fp32 per matrix (A is drawn anew in each hook, never kept).
    model, batches = tiny_bert(), token_batches()
    targets = find_targets(model)
    ranks = {t.name: 2 for t in targets}
    sketch = gradient_sketch(model, batches, targets, ranks, seed=0)
    held = [v for v in vars(sketch).values() if isinstance(v, torch.Tensor)]
    held += [t for v in vars(sketch).values() if isinstance(v, dict) for t in v.values() if isinstance(t, torch.Tensor)]
    assert sum(t.numel() for t in held) == sum(t.shape[0] * 2 for t in targets)
    assert torch.equal(sketch.a(targets[0].name), draw_a(targets[0].name, 2, targets[0].shape[1], seed=0))
