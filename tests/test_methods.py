"""One suite over every registered fine-tuning method, plus method-specific checks.

The shared tests run on tiny_bert (classification) and tiny_llama (causal LM) for whatever
:func:`senslora.training.methods.load_all` registers. Training goes through the real training loop
(:func:`senslora.training.loop.build_loop` and :meth:`~senslora.training.loop.Loop.run`, as
:func:`senslora.training.train.train` runs it: hooks, extra loss, clipping, AdamW, the linear
schedule, checkpoints), on fixed token batches instead of a tokenised task; ``on_eval`` is called
before evaluating. :func:`test_a_whole_run_reproduces` runs the public ``train`` per method.

Budget: a method's parameters are compared with uniform LoRA at the same average rank,
``avg_rank * sum(d_in + d_out)`` over the default targets. The count compared is the method's
``budget_parameter_count(model)`` (AdaLoRA: its final target budget
``target_r * sum(d_in + d_out + 1)``, since it trains ``init_r = 1.5 x`` and prunes down; by default
``adapter_parameter_count``, the trainable parameters outside the task head).
"""

from __future__ import annotations

import gc
import io

import pytest
import torch
from tiny import tiny_bert, tiny_llama, token_batches

from senslora.core.inits import INITS
from senslora.core.losses import model_inputs, per_example_loss
from senslora.core.presets import DEFAULT_PRESET, PRESET_INITS
from senslora.core.targets import find_targets
from senslora.training.checkpoint import TrainState, checkpoints
from senslora.training.config import TrainConfig
from senslora.training.loop import build_loop, make_accelerator
from senslora.training.methods import METHODS, MethodContext, load_all
from senslora.training.methods.base import adapter_parameter_count, head_parameter_names
from senslora.training.methods.lora import SensLoRA

load_all()
METHOD_NAMES = sorted(METHODS)
BUDGETED = [name for name in METHOD_NAMES if name != "full"]
MINE = {"adalora", "dylora", "eva", "houlsby", "pfeiffer"}


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=100,
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


# model key -> (builder, task kind, label kind of token_batches)
MODELS = {
    "bert": (tiny_bert, "classification", "class"),
    "llama": (tiny_llama, "causal-lm", "lm"),
    "gpt2": (tiny_gpt2, "causal-lm", "lm"),
}
SHARED_MODELS = ("bert", "llama")


@pytest.fixture(autouse=True, scope="module")
def _frozen_heap():
    # The loop's memory measurement runs gc.collect() twice per run; with every object alive now
    # (modules, torch, transformers) moved out of the collector's sight it takes milliseconds.
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models are slower with two contending threads (EVA's low-rank SVDs especially).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_ctx(kind: str, out_dir=None, **overrides) -> MethodContext:
    _, task_kind, labels = MODELS[kind]
    overrides.setdefault("calibration_batches", token_batches(4, batch_size=8, seq=12, labels=labels))
    overrides.setdefault("total_steps", 6)
    return MethodContext(task_kind=task_kind, out_dir=out_dir, **overrides)


def prepared(name: str, kind: str, out_dir=None, **overrides):
    """(method, prepared model, ctx) on a fresh tiny model."""
    ctx = make_ctx(kind, out_dir, **overrides)
    method = METHODS[name]()
    model = method.prepare(MODELS[kind][0](), ctx)
    return method, model, ctx


def train_batches(kind: str) -> list[dict]:
    return token_batches(3, seed=1, labels=MODELS[kind][2])


class Interrupt(Exception):
    pass


def train(method, model, batches: list[dict], steps: int, *, out=None, stop_after=None, resume=False):
    """Optimizer steps ``0 .. steps - 1`` on ``batches[step % len(batches)]`` (one epoch) through the
    real training loop, with lr 1e-2 and no warm-up. ``out``: write checkpoints there (every 2
    steps); ``stop_after``: interrupt the run after that step; ``resume``: continue from the last
    checkpoint in ``out``. Returns the loop's final :class:`TrainState`."""
    config = TrainConfig(method=method.name, lr=1e-2, warmup_ratio=0.0, epochs=1, save_every=2)

    def stop(step: int) -> None:
        if step == stop_after:
            raise Interrupt

    loop = build_loop(model, method, config, steps, make_accelerator("cpu"), out=out, step_callback=stop)
    state = loop.resume(checkpoints(out)[-1]) if resume else TrainState()
    try:
        loop.run(state, lambda epoch: [batches[step % len(batches)] for step in range(steps)])
    finally:
        model.eval()
    assert state.step == steps and len(state.history) == 1
    return state


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def task_loss(model, batch: dict) -> float:
    with torch.no_grad():
        return float(per_example_loss(model, batch).mean())


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def lora_reference(kind: str, avg_rank: int) -> int:
    return avg_rank * sum(t.lora_params_per_rank for t in find_targets(MODELS[kind][0]()))


# ----------------------------------------------------------------------------- shared suite
@pytest.mark.parametrize("kind", SHARED_MODELS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_prepare_trains_only_the_method_parameters(name, kind, tmp_path):
    base = MODELS[kind][0]()
    base_ids = {id(p) for p in base.parameters()}
    model = METHODS[name]().prepare(base, make_ctx(kind, tmp_path))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    heads = set(head_parameter_names(model))
    if name == "full":
        assert trainable == set(params)
        return
    assert adapter_parameter_count(model) > 0
    # No weight of the base model is trained, except the task head's.
    assert {n for n in trainable if id(params[n]) in base_ids} <= heads
    if kind == "bert":
        assert trainable & heads, "the classification head must be trained"
    else:
        assert not any("lm_head" in n for n in trainable)


@pytest.mark.parametrize("kind", SHARED_MODELS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_training_moves_trainable_and_keeps_frozen_parameters(name, kind, tmp_path):
    method, model, _ = prepared(name, kind, tmp_path)
    batch = train_batches(kind)[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = task_loss(model, batch)
    train(method, model, [batch], steps=5)
    method.on_eval(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert changed, "no trainable parameter moved"
    assert not changed & frozen, f"frozen parameters changed: {sorted(changed & frozen)[:3]}"
    assert task_loss(model, batch) < loss_before


@pytest.mark.parametrize("kind", SHARED_MODELS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_save_then_load_on_a_fresh_base_reproduces_outputs(name, kind, tmp_path):
    method, model, ctx = prepared(name, kind, tmp_path / "run")
    batches = train_batches(kind)
    train(method, model, batches, steps=3)
    method.on_eval(model)
    expected = logits(model, batches[0])
    (tmp_path / "adapter").mkdir()
    method.save(model, tmp_path / "adapter")
    fresh = METHODS[name]()
    loaded = fresh.load(MODELS[kind][0](), tmp_path / "adapter", ctx)
    fresh.on_eval(loaded)
    loaded.eval()
    torch.testing.assert_close(logits(loaded, batches[0]), expected)


@pytest.mark.parametrize("kind", SHARED_MODELS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_same_seed_gives_identical_parameters(name, kind, tmp_path):
    def run(sub: str) -> dict[str, torch.Tensor]:
        method, model, _ = prepared(name, kind, tmp_path / sub)
        train(method, model, train_batches(kind), steps=3)
        return trainable(model)

    first, second = run("a"), run("b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.parametrize("kind", SHARED_MODELS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_resume_from_a_checkpoint_matches_uninterrupted_training(name, kind, tmp_path):
    """Checkpoint = trainable weights + optimizer and scheduler state + RNG + ``method.state_dict()``."""
    batches = train_batches(kind)
    method, model, _ = prepared(name, kind, tmp_path / "a")
    train(method, model, batches, steps=4)
    expected = trainable(model)

    method, model, _ = prepared(name, kind, tmp_path / "b")
    with pytest.raises(Interrupt):
        train(method, model, batches, steps=4, out=tmp_path / "b", stop_after=3)
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-2"]
    has_state = method.state_dict() is not None
    assert (tmp_path / "b" / "checkpoints" / "step-2" / "method.pt").is_file() == has_state

    method, model, _ = prepared(name, kind, tmp_path / "c")
    assert trainable(model).keys() == expected.keys()
    state = train(method, model, batches, steps=4, out=tmp_path / "b", resume=True)
    assert state.resumed_at == [2]
    resumed = trainable(model)
    assert all(torch.equal(resumed[n], expected[n]) for n in expected)


@pytest.mark.parametrize("avg_rank", [2, 4, 8])
@pytest.mark.parametrize("kind", SHARED_MODELS)
@pytest.mark.parametrize("name", BUDGETED)
def test_budget_within_ten_percent_of_uniform_lora(name, kind, avg_rank, tmp_path):
    method, model, _ = prepared(name, kind, tmp_path, avg_rank=avg_rank)
    count = method.budget_parameter_count(model)
    reference = lora_reference(kind, avg_rank)
    assert abs(count - reference) <= 0.1 * reference, (count, reference)


@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    """A tiny BERT classifier folder (word-level tokenizer) and a 30-row sentiment CSV."""
    from conftest import make_word_tokenizer
    from tiny import write_sentiment_csv

    root = tmp_path_factory.mktemp("run-assets")
    tiny_bert().save_pretrained(root / "bert")
    make_word_tokenizer().save_pretrained(root / "bert")
    write_sentiment_csv(root / "sentiment.csv", n=30)
    return root


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_a_whole_run_reproduces(name, run_assets, tmp_path):
    """The public ``train`` (one epoch, checkpoints every 2 steps), then ``evaluate_run`` on the saved adapter."""
    from senslora.training.train import evaluate_run
    from senslora.training.train import train as train_run

    config = TrainConfig(
        method=name,
        model=str(run_assets / "bert"),
        task=f"csv:{run_assets / 'sentiment.csv'}",
        epochs=1,
        batch_size=8,
        max_length=16,
        lr=1e-2,
        calib_samples=8,
        save_every=2,
        keep_checkpoints=True,
        eval_each_epoch=False,
        options={"plot": False},
        device="cpu",
    )
    result = train_run(config, tmp_path / "run", progress=False)
    train_size = result["data"]["train"]
    if name == "tsqlora":  # trains on what its data-quality selection keeps
        assert train_size == result["data_selection"]["counts"]["kept"] < 24
    else:
        assert train_size == 24
    assert result["steps"] == -(-train_size // 8)
    assert checkpoints(tmp_path / "run")[-1].name == f"step-{result['steps']}"
    if name != "full":
        budget, reference = result["budget_params"], lora_reference("bert", 4)
        assert abs(budget - reference) <= 0.1 * reference, (budget, reference)
    assert evaluate_run(tmp_path / "run")["reproduced"]


def test_this_suite_covers_the_baselines():
    assert MINE <= set(METHODS)


# ----------------------------------------------------------------------------- AdaLoRA
def test_adalora_schedule_fractions():
    from senslora.training.methods.adalora import adalora_schedule

    assert adalora_schedule(1000) == (100, 200, 10)
    assert adalora_schedule(2) == (0, 1, 1)  # the final allocation still happens (at step 1)
    assert adalora_schedule(1) == (0, 0, 1)


def test_adalora_allocates_every_step_and_ends_at_the_target_rank():
    method, model, _ = prepared("adalora", "bert", avg_rank=2, total_steps=6)
    calls: list[int] = []
    allocate = model.base_model.update_and_allocate

    def spy(step: int) -> None:
        calls.append(step)
        allocate(step)

    model.base_model.update_and_allocate = spy
    train(method, model, train_batches("bert"), steps=6)
    assert calls == list(range(6))
    record = method.record
    assert (record["init_r"], record["target_r"]) == (3, 2)
    assert record["rank_pattern_step"] <= 6 - record["tfinal"]  # the final pattern is fixed by then
    ranks = record["rank_pattern"]
    n_targets = len(find_targets(tiny_bert()))
    assert len(ranks) == n_targets
    assert sum(ranks.values()) == record["target_rank_budget"] == 2 * n_targets
    assert max(ranks.values()) <= 3 and min(ranks.values()) < 3
    # The pruned triplets' singular values are zero in the model.
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if hasattr(module, "lora_E"):
            kept = int((module.lora_E["default"] != 0).sum())
            assert kept == ranks[name.removeprefix(prefix)]


def test_adalora_extra_loss_is_pefts_orthogonality_penalty():
    method, model, _ = prepared("adalora", "bert")
    batch = train_batches("bert")[0]
    extra = method.extra_loss(model)
    assert extra is not None and extra.requires_grad and float(extra.detach()) > 0
    with torch.no_grad():
        ours = per_example_loss(model, batch).mean()
        # PEFT adds the penalty to outputs.loss only when the model computes its own loss.
        peft = model(**model_inputs(batch), labels=batch["labels"]).loss
    torch.testing.assert_close(peft - ours, extra.detach())


# ----------------------------------------------------------------------------- DyLoRA
def _draws(method, model, steps: range) -> list[int]:
    out = []
    for step in steps:
        method.on_step_begin(model, step)
        out.append(method.rank_in_use)
    return out


def test_dylora_samples_ranks_uniformly_in_range_and_deterministically():
    method, model, _ = prepared("dylora", "bert", avg_rank=4, seed=0)
    ranks = _draws(method, model, range(40))
    assert set(ranks) == {1, 2, 3, 4}
    again, model2, _ = prepared("dylora", "bert", avg_rank=4, seed=0)
    assert _draws(again, model2, range(40)) == ranks
    other, model3, _ = prepared("dylora", "bert", avg_rank=4, seed=1)
    assert _draws(other, model3, range(40)) != ranks
    # Micro-batches of one optimizer step share its rank.
    method.on_step_begin(model, 39)
    assert method.rank_in_use == ranks[-1]


def test_dylora_uses_only_the_first_b_components():
    from peft.tuners.lora import LoraLayer

    method, model, _ = prepared("dylora", "bert", avg_rank=4)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:  # non-zero B, so that A gets gradients too
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    step = next(s for s in range(100) if _draws(method, model, [s])[0] < 4)
    method.on_step_begin(model, step)
    b = method.rank_in_use
    # The hooked lora_A output is the first b components, scaled by r / b.
    lora_a = layers[0].lora_A["default"]
    x = torch.randn(3, lora_a.in_features)
    expected = (x @ lora_a.weight.T) * torch.tensor([4 / b] * b + [0.0] * (4 - b))
    torch.testing.assert_close(lora_a(x), expected)
    per_example_loss(model, train_batches("bert")[0]).mean().backward()
    for layer in layers:
        grad_a, grad_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        assert torch.count_nonzero(grad_a[b:]) == 0 and torch.count_nonzero(grad_b[:, b:]) == 0
    assert any(torch.count_nonzero(layer.lora_A["default"].weight.grad[:b]) > 0 for layer in layers)


def test_dylora_evaluates_at_full_rank(tmp_path):
    from peft import PeftModel

    method, model, _ = prepared("dylora", "bert", avg_rank=4)
    batch = train_batches("bert")[0]
    train(method, model, [batch], steps=3)
    step = next(s for s in range(3, 100) if _draws(method, model, [s])[0] < 4)
    method.on_step_begin(model, step)
    truncated = logits(model, batch)
    method.on_eval(model)
    assert method.rank_in_use == 4
    full = logits(model, batch)
    assert not torch.allclose(truncated, full)
    # Full rank is plain PEFT LoRA: the saved adapter, loaded without DyLoRA, gives the same.
    model.save_pretrained(str(tmp_path))
    plain = PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(plain, batch), full)


def test_dylora_sampler_state_round_trips():
    method, model, _ = prepared("dylora", "bert", avg_rank=8, seed=3)
    _draws(method, model, range(5))
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    expected = _draws(method, model, range(5, 15))
    resumed, model2, _ = prepared("dylora", "bert", avg_rank=8, seed=99)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert _draws(resumed, model2, range(5, 15)) == expected


# ----------------------------------------------------------------------------- adapters
EXPECTED_SITES = {
    "bert": {"attention": "attention.output.dense", "ffn": "output.dense", "blocks": "bert.encoder.layer"},
    "llama": {"attention": "self_attn.o_proj", "ffn": "mlp.down_proj", "blocks": "model.layers"},
    "gpt2": {"attention": "attn.c_proj", "ffn": "mlp.c_proj", "blocks": "transformer.h"},
}


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("name", ["houlsby", "pfeiffer"])
def test_adapters_start_as_identity_after_the_output_projections(name, kind):
    from senslora.training.methods.adapters import ADAPTER_ATTR

    base = MODELS[kind][0]()
    batch = train_batches(kind)[0]
    expected = logits(base, batch)
    method = METHODS[name]()
    model = method.prepare(base, make_ctx(kind))
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)
    sites = {n for n, m in model.named_modules() if hasattr(m, ADAPTER_ATTR)}
    places = ("attention", "ffn") if name == "houlsby" else ("ffn",)
    where = EXPECTED_SITES[kind]
    assert sites == {f"{where['blocks']}.{i}.{where[p]}" for i in range(2) for p in places}
    # The adapters are in the forward path: a non-zero up-projection changes the outputs.
    for site in sites:
        torch.nn.init.normal_(getattr(model.get_submodule(site), ADAPTER_ATTR).up.weight)
    assert not torch.allclose(logits(model, batch), expected)


def test_bottleneck_size_matches_the_lora_budget_for_minilm_dims():
    from senslora.training.methods.adapters import bottleneck_size

    # MiniLM-L6: hidden 384, FFN 1536, 6 blocks; uniform LoRA costs 41472 parameters per rank.
    per_rank = 6 * (4 * (384 + 384) + 2 * (384 + 1536))
    assert per_rank == 41472
    assert bottleneck_size([384] * 12, 4 * per_rank) == 17  # houlsby: 161484 vs 165888
    assert bottleneck_size([384] * 6, 4 * per_rank) == 35  # pfeiffer: 163794 vs 165888
    assert bottleneck_size([384] * 12, 10) == 1  # never below 1


# ----------------------------------------------------------------------------- EVA
def test_eva_initialises_a_from_the_data_within_the_rank_budget():
    from peft.tuners.lora import LoraLayer

    def eva_a(seed: int) -> tuple[dict[str, torch.Tensor], dict]:
        ctx = make_ctx("bert", avg_rank=4)
        base = tiny_bert()
        torch.manual_seed(seed)  # a random init would differ between the two seeds
        method = METHODS["eva"]()
        model = method.prepare(base, ctx)
        weights = {
            n: m.lora_A["default"].weight.detach().clone()
            for n, m in model.named_modules()
            if isinstance(m, LoraLayer)
        }
        return weights, method.record

    first, record = eva_a(0)
    second, _ = eva_a(1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    for a in first.values():  # rows are orthonormal principal directions of the layer inputs
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)
    ranks = record["eva_ranks"]
    assert sum(ranks.values()) == record["eva_rank_budget"] == 4 * len(find_targets(tiny_bert()))
    assert max(ranks.values()) <= 2 * 4  # rho = 2


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_init_for_names_the_init_a_run_uses_and_only_for_methods_that_read_one(name):
    """The contract the benchmark compares runs by: what ``method_record.init`` will say."""
    method = METHODS[name]()
    options = {**method.implied_options}
    if not method.reads_init:
        assert method.init_for(options) is None
        return
    default = method.init_for(options)
    assert default in INITS
    if "init" in method.implied_options:  # pissa, lora-ga: uniform LoRA with that init
        assert default == method.implied_options["init"]
    elif isinstance(method, SensLoRA):  # the preset's init
        assert default == PRESET_INITS[DEFAULT_PRESET] and method.init_for({"preset": "paper"}) == "zero"
    else:
        assert default == "zero"  # uniform LoRA: PEFT's
    if "init" not in method.implied_options:
        assert method.init_for({**options, "init": "olora"}) == "olora"  # an explicit init wins
