"""Hessian-diagonal estimators: exact references per estimator, then one shared suite over the registry."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
import torch.nn as nn
from tiny import tiny_bert, tiny_llama, token_batches
from torch.autograd.functional import hessian
from torch.func import functional_call

from senslora.core.errors import SensloraError
from senslora.core.estimators import ESTIMATORS, Estimator, estimate_diagonals
from senslora.core.losses import model_inputs, per_example_loss
from senslora.core.targets import find_targets


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


class ToyMLP(nn.Module):
    """Features (B, d) -> logits: ``input_ids`` carries float features, blocks see 2-D inputs."""

    def __init__(self, sizes=(3, 4, 3), shared_calls: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.shared_calls = shared_calls

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = input_ids
        for i, block in enumerate(self.blocks):
            # The first block may run several times (weight sharing, as in ALBERT).
            for _ in range(self.shared_calls if i == 0 else 1):
                h = block(h)
                h = torch.tanh(h) if i < len(self.blocks) - 1 else h
        return h


def toy_batches(sizes=(5, 3), d: int = 3, classes: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randn(b, d, generator=g), "labels": torch.randint(0, classes, (b,), generator=g)}
        for b in sizes
    ]


def trim(batch: dict, n: int) -> dict:
    """Example n alone, without its padding."""
    length = int(batch["attention_mask"][n].sum())
    return {k: v[n : n + 1, :length] if v.dim() == 2 else v[n : n + 1] for k, v in batch.items()}


def as_linear(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """(d_out, d_in) view of a weight-shaped tensor (GPT-2 Conv1D stores (d_in, d_out))."""
    return tensor.T if type(module).__name__ == "Conv1D" else tensor


# ---------------------------------------------------------------- activation: exact


def test_activation_equals_hessian_of_layerwise_reconstruction_loss():
    model = tiny_bert()
    batches = token_batches(2, batch_size=4)  # padded
    target = next(t for t in find_targets(model) if t.name.endswith("layer.1.attention.self.query"))
    # The real inputs the layer sees, non-padding tokens only (boolean indexing, unlike the estimator).
    seen = []
    handle = target.module.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**model_inputs(b))
            seen[-1] = seen[-1][b["attention_mask"].bool()]
    handle.remove()
    x = torch.cat(seen).double()
    w0 = target.module.weight.detach().double()
    y = x @ w0.T + 0.1

    def reconstruction(w: torch.Tensor) -> torch.Tensor:
        # Mean over tokens of ||W x_t - y_t||^2.
        return (x @ w.T - y).square().sum(dim=1).mean()

    exact = torch.diagonal(hessian(reconstruction, w0).reshape(w0.numel(), -1)).reshape(w0.shape)
    got = estimate_diagonals("activation", model, batches, [target], progress=False)[target.name]
    assert got.compact and got.values.shape == (w0.shape[1],)
    torch.testing.assert_close(got.dense().double(), exact, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
@pytest.mark.parametrize("scratch", [None, 16])  # 16 squares: one row per chunk, many chunks
def test_activation_squares_each_shared_input_once_and_matches_per_layer_hooks(make, scratch, monkeypatch):
    from senslora.core.estimators import ActivationEstimator, activation

    if scratch is not None:
        monkeypatch.setattr(activation, "SCRATCH_ELEMENTS", scratch)
    model = make()
    batches = token_batches(2, batch_size=4)  # padded
    targets = find_targets(model)
    # Reference: every target's own masked mean of x^2, from its own hook.
    sums = {t.name: torch.zeros(t.shape[1], dtype=torch.float64) for t in targets}
    counts = dict.fromkeys(sums, 0.0)
    handles = []
    for t in targets:

        def hook(m, i, o, name=t.name):
            x = i[0].detach()[current["mask"]].double()
            sums[name] += x.square().sum(dim=0)
            counts[name] += x.shape[0]

        handles.append(t.module.register_forward_hook(hook))
    current = {}
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            model(**model_inputs(b))
    for h in handles:
        h.remove()
    calls = []
    original = ActivationEstimator._column_sums
    monkeypatch.setattr(
        ActivationEstimator, "_column_sums", lambda self, x: calls.append(1) or original(self, x)
    )
    got = estimate_diagonals("activation", model, batches, targets, progress=False)
    for t in targets:
        torch.testing.assert_close(
            got[t.name].values.double(), 2 * sums[t.name] / counts[t.name], rtol=1e-5, atol=1e-6
        )
    # bert: q/k/v share one input (4 distinct of 6 targets per layer); llama: q/k/v and gate/up
    # (4 distinct of 7).
    assert len(calls) == 4 * 2 * len(batches) < len(targets) * len(batches)
    # Inference-mode tensors have no version counter: no reuse, same values.
    with torch.inference_mode():
        again = estimate_diagonals("activation", model, batches, targets, progress=False)
    for t in targets:
        torch.testing.assert_close(again[t.name].values, got[t.name].values)


def test_activation_counts_2d_inputs_per_example():
    model, batches = ToyMLP(), toy_batches()
    x = torch.cat([b["input_ids"] for b in batches])
    got = estimate_diagonals("activation", model, batches, find_targets(model), progress=False)
    torch.testing.assert_close(got["blocks.0"].values, 2 * x.square().mean(dim=0))


# ---------------------------------------------------------------- fisher: exact


def explicit_fisher(model: nn.Module, examples: list[dict]) -> dict[str, torch.Tensor]:
    """Mean over examples of squared per-example gradients, one autograd call per example."""
    targets = find_targets(model)
    sums = {t.name: torch.zeros(t.shape) for t in targets}
    for example in examples:
        grads = torch.autograd.grad(
            per_example_loss(model, example).sum(), [t.module.weight for t in targets]
        )
        for t, grad in zip(targets, grads, strict=True):
            sums[t.name] += as_linear(t.module, grad).square()
    return {name: s / len(examples) for name, s in sums.items()}


@pytest.mark.parametrize(
    "make, labels",
    [(tiny_bert, "class"), (tiny_gpt2, "lm"), (tiny_llama, "lm")],
    ids=["bert", "gpt2", "llama"],
)
def test_fisher_equals_mean_of_squared_per_example_gradients(make, labels):
    model = make()
    batches = token_batches(2, batch_size=3, labels=labels)  # padded examples in every batch
    examples = [trim(b, n) for b in batches for n in range(b["input_ids"].shape[0])]
    expected = explicit_fisher(model, examples)
    got = estimate_diagonals("fisher", model, batches, find_targets(model), progress=False)
    for name, diagonal in got.items():
        assert not diagonal.compact
        torch.testing.assert_close(diagonal.values, expected[name], rtol=1e-4, atol=1e-9)


def test_fisher_sums_gradients_of_a_module_called_twice():
    model, batches = ToyMLP(sizes=(3, 3, 2), shared_calls=2), toy_batches(classes=2)
    examples = [{k: v[n : n + 1] for k, v in b.items()} for b in batches for n in range(len(b["labels"]))]
    got = estimate_diagonals("fisher", model, batches, find_targets(model), progress=False)
    for name, expected in explicit_fisher(model, examples).items():
        torch.testing.assert_close(got[name].values, expected)


def test_fisher_computes_no_weight_gradient():
    # The per-example products replace dL/dW: the backward must never reach a weight (a hook on
    # a leaf fires whenever autograd computes its gradient). fisher-batch, which does need
    # dL/dW, shows that the hooks do fire.
    model, batches = tiny_llama(), token_batches(1, batch_size=2, labels="lm")
    targets = find_targets(model)
    reached: list[str] = []
    handles = [t.module.weight.register_hook(lambda g, n=t.name: reached.append(n)) for t in targets]
    try:
        estimate_diagonals("fisher", model, batches, targets, progress=False)
        assert reached == []
        estimate_diagonals("fisher-batch", model, batches, targets, progress=False)
        assert set(reached) == {t.name for t in targets}
    finally:
        for h in handles:
            h.remove()


def test_fisher_batch_is_the_squared_batch_gradient_not_the_fisher():
    model, batches = ToyMLP(), toy_batches(sizes=(4,))
    weight = model.blocks[0].weight
    (grad,) = torch.autograd.grad(per_example_loss(model, batches[0]).mean(), [weight])
    targets = find_targets(model)
    got = estimate_diagonals("fisher-batch", model, batches, targets, progress=False)["blocks.0"]
    torch.testing.assert_close(got.values, grad.square())
    fisher = estimate_diagonals("fisher", model, batches, targets, progress=False)["blocks.0"]
    assert not torch.allclose(got.values, fisher.values)


# ---------------------------------------------------------------- hutchinson: converges


def test_hutchinson_converges_to_exact_hessian_diagonal():
    # Stated tolerance: relative error < 0.1 with 1000 probes on a 4 x 3 matrix (observed 0.01-0.03
    # over seeds), and smaller than with 100 probes.
    model, batches = ToyMLP(), toy_batches(sizes=(8,))
    targets = find_targets(model, ["blocks.0"])
    batch = batches[0]
    w = model.blocks[0].weight.detach()

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        # Mean task loss as a function of the target matrix alone.
        logits = functional_call(model, {"blocks.0.weight": w}, (batch["input_ids"],))
        return nn.functional.cross_entropy(logits, batch["labels"])

    exact = torch.diagonal(hessian(loss_of, w).reshape(w.numel(), -1)).reshape(w.shape).clamp(min=0)
    errors = {}
    for probes in (100, 1000):
        got = estimate_diagonals("hutchinson", model, batches, targets, num_probes=probes, progress=False)
        errors[probes] = float((got["blocks.0"].values - exact).norm() / exact.norm())
    assert errors[1000] < 0.1 and errors[1000] < errors[100], errors


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_weights_batches_by_size():
    # y = W x (d_in = 1) with a per-example mean squared error over k outputs: the Hessian in W is
    # diagonal, 2 x^2 / k per example, so one probe gives it exactly; batches of 5 and 3 examples.
    model, k = ToyMLP(sizes=(1, 4)), 4
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randn(b, 1, generator=g), "labels": torch.randn(b, k, generator=g)}
        for b in (5, 3)
    ]
    x = torch.cat([b["input_ids"] for b in batches])
    got = estimate_diagonals("hutchinson", model, batches, find_targets(model), num_probes=1, progress=False)
    expected = (2 * x.square().mean() / k).expand(k, 1)
    torch.testing.assert_close(got["blocks.0"].values, expected)


def test_hutchinson_clamps_negative_entries_and_counts_them():
    # A concave loss (-||logits||^2) has a negative Hessian diagonal everywhere; with enough probes
    # (one probe's off-diagonal noise can flip a sign) every estimated entry is negative too.
    model, batches = ToyMLP(sizes=(3, 2)), toy_batches(sizes=(4,))

    def concave(model: nn.Module, batch: dict) -> torch.Tensor:
        return -model(batch["input_ids"]).square().sum(dim=-1)

    got = estimate_diagonals(
        "hutchinson", model, batches, find_targets(model), loss_fn=concave, num_probes=64, progress=False
    )
    diagonal = got["blocks.0"]
    assert diagonal.clamped == diagonal.numel and torch.equal(diagonal.values, torch.zeros(2, 3))


def test_hutchinson_seed_changes_probes():
    model, batches = ToyMLP(), toy_batches()
    targets = find_targets(model)
    a, b = (estimate_diagonals("hutchinson", model, batches, targets, seed=s, progress=False) for s in (0, 1))
    assert not torch.equal(a["blocks.0"].values, b["blocks.0"].values)


def test_hutchinson_needs_switchable_attention():
    class Fixed(ToyMLP):
        config = types.SimpleNamespace(_attn_implementation="sdpa")

    model = Fixed()
    with pytest.raises(SensloraError, match="attn_implementation='eager'"):
        estimate_diagonals("hutchinson", model, toy_batches(), find_targets(model), progress=False)


# ---------------------------------------------------------------- shared suite over the registry

MODELS = {"bert": (tiny_bert, "class"), "llama": (tiny_llama, "lm"), "gpt2": (tiny_gpt2, "lm")}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_contract(estimator, model_name):
    make, labels = MODELS[model_name]
    model = make()
    batches = token_batches(2, batch_size=3, seq=8, labels=labels)
    targets = find_targets(model)
    # A state to restore: training on, one submodule in eval, some parameters frozen.
    model.train()
    targets[0].module.eval()
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    attn = model.config._attn_implementation

    first = estimate_diagonals(estimator, model, batches, targets, seed=3, progress=False)
    again = estimate_diagonals(estimator, model, batches, targets, seed=3, progress=False)

    assert list(first) == [t.name for t in targets]
    for t in targets:
        diagonal = first[t.name]
        assert diagonal.shape == t.shape  # (d_out, d_in), also for GPT-2 Conv1D
        expected = (t.shape[1],) if diagonal.compact else t.shape
        assert tuple(diagonal.values.shape) == expected
        assert diagonal.values.dtype == torch.float32 and diagonal.values.device.type == "cpu"
        assert torch.isfinite(diagonal.values).all() and (diagonal.values >= 0).all()
        assert diagonal.values.sum() > 0
        assert torch.equal(diagonal.values, again[t.name].values)  # deterministic
        assert not t.module._forward_hooks and not t.module._backward_hooks
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.config._attn_implementation == attn
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_one_fp32_accumulator_per_matrix_becomes_the_diagonal(estimator):
    # Issue 6 (large models): one fp32 accumulator per target, even for a bf16 model, and _finish
    # hands it over in place (the diagonal is the accumulator's memory, not a second copy).
    cls = ESTIMATORS[estimator]

    class Watched(cls):
        def _finish(self):
            self.before = {name: (t.dtype, t.data_ptr()) for name, t in self.sums.items()}
            return super()._finish()

    model = tiny_bert().to(torch.bfloat16)
    targets = find_targets(model)
    instance = Watched()
    got = instance.estimate(model, token_batches(2, batch_size=3, seq=8), targets, progress=False)
    assert sorted(instance.before) == sorted(t.name for t in targets)
    assert {dtype for dtype, _ in instance.before.values()} == {torch.float32}
    assert all(got[name].values.data_ptr() == ptr for name, (_, ptr) in instance.before.items())
    assert instance.sums == {}  # nothing else kept


def test_hutchinson_probes_depend_on_seed_and_batch_index_only():
    # The probes of batch i are seeded from (seed, i), so any shard of the batches (one process's
    # under a launcher) adds up to the whole run: the sums of batches {0, 2} and {1} give all three.
    from senslora.core.estimators import probe_seed

    class Shard(ESTIMATORS["hutchinson"]):
        def __init__(self, keep, **kwargs):
            super().__init__(**kwargs)
            self.keep = keep

        def _step(self, model, batch):
            return super()._step(model, batch) if self.batch_index in self.keep else 0

        def _finish(self):
            self.raw = {name: t.clone() for name, t in self.sums.items()}
            return super()._finish()

    model, batches = ToyMLP(), toy_batches(sizes=(5, 3, 4))
    targets = find_targets(model)
    raw = {}
    for keep in ((0, 1, 2), (0, 2), (1,)):
        estimator = Shard(keep, seed=3)
        estimator.estimate(model, batches, targets, progress=False)
        raw[keep] = estimator.raw
    for name, total in raw[(0, 1, 2)].items():
        torch.testing.assert_close(raw[(0, 2)][name] + raw[(1,)][name], total)
    assert len({probe_seed(s, i) for s in (3, 4) for i in (0, 1)}) == 4


def test_gpt2_conv1d_shape_convention():
    model = tiny_gpt2()
    target = next(t for t in find_targets(model) if t.name.endswith("h.0.attn.c_attn"))
    assert tuple(target.module.weight.shape) == (16, 48) and target.shape == (48, 16)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_declared_capabilities_hold(estimator):
    # Each class declares its contract (Estimator's capability attributes); run on a tiny model,
    # every declaration must match what the estimator does.
    cls = ESTIMATORS[estimator]
    assert issubclass(cls, Estimator) and not inspect.isabstract(cls)
    model = tiny_bert()
    targets = find_targets(model)
    labelled = token_batches(2, batch_size=3, seq=8)
    seen = {"grad": set(), "attn": set()}

    class Watched(cls):
        def _step(self, model, batch):
            seen["grad"].add(torch.is_grad_enabled())
            seen["attn"].add(model.config._attn_implementation)
            return super()._step(model, batch)

    got = {s: Watched(seed=s).estimate(model, labelled, targets, progress=False) for s in (0, 1)}
    assert seen["grad"] == {cls.needs_grad}

    class NoGrad(cls):
        def _step(self, model, batch):
            with torch.no_grad():
                return super()._step(model, batch)

    if cls.needs_grad:  # it does backpropagate: without autograd it cannot run
        with pytest.raises(RuntimeError):
            NoGrad().estimate(model, labelled, targets, progress=False)
    else:
        NoGrad().estimate(model, labelled, targets, progress=False)
    assert seen["attn"] == ({"eager"} if cls.eager_attention else {model.config._attn_implementation})
    for t in targets:
        diagonal = got[0][t.name]
        assert diagonal.compact == cls.compact
        assert tuple(diagonal.values.shape) == ((t.shape[1],) if cls.compact else t.shape)
        assert torch.isfinite(diagonal.values).all()
        if cls.nonnegative:
            assert (diagonal.values >= 0).all()
    differs = any(not torch.equal(got[0][t.name].values, got[1][t.name].values) for t in targets)
    assert differs == cls.seeded  # the seed matters exactly when declared
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in labelled]
    if cls.needs_labels:
        with pytest.raises(SensloraError, match="labels"):
            estimate_diagonals(estimator, model, unlabelled, targets, progress=False)
    else:
        plain = estimate_diagonals(estimator, model, unlabelled, targets, progress=False)
        assert all(torch.equal(plain[t.name].values, got[0][t.name].values) for t in targets)
    # Every declared option is a keyword of the constructor; an undeclared one is refused.
    assert set(cls.options) <= set(inspect.signature(cls).parameters)
    with pytest.raises(SensloraError, match="unknown option"):
        estimate_diagonals(estimator, model, labelled, targets, progress=False, not_an_option=1)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_empty_calibration_set(estimator):
    model = ToyMLP()
    with pytest.raises(SensloraError, match="empty calibration set"):
        estimate_diagonals(estimator, model, [], find_targets(model), progress=False)
    assert not model.blocks[0]._forward_hooks


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_nan_weights_are_reported(estimator):
    model = tiny_bert()
    targets = find_targets(model)
    with torch.no_grad():
        targets[0].module.weight.fill_(float("nan"))
    with pytest.raises(SensloraError, match="non-finite Hessian diagonal in bert.encoder"):
        estimate_diagonals(estimator, model, token_batches(1), targets, progress=False)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_hooks_removed_and_state_restored_after_an_error(estimator):
    model = ToyMLP()
    model.train()
    bad = [{"input_ids": torch.randn(2, 5), "labels": torch.tensor([0, 1])}]  # wrong feature size
    with pytest.raises(RuntimeError):
        estimate_diagonals(estimator, model, bad, find_targets(model), progress=False)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.cuda
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_accumulate_on_device_keeps_the_accumulators_there(estimator):
    # On a CUDA model "device" keeps the fp32 accumulators (and so the diagonals) on the GPU and
    # "cpu" on the host; the values agree. (On a CPU model both are the host: nothing to tell apart.)
    cls = ESTIMATORS[estimator]

    class Watched(cls):
        def _finish(self):
            self.where = {t.device.type for t in self.sums.values()}
            return super()._finish()

    model = tiny_bert().cuda()
    targets = find_targets(model)
    batches = token_batches(2, batch_size=3, seq=8)
    got = {}
    for accumulate_on, device in (("device", "cuda"), ("cpu", "cpu")):
        instance = Watched(seed=1)
        got[accumulate_on] = instance.estimate(model, batches, targets, accumulate_on=accumulate_on, progress=False)
        # activation keeps its small (d_in,) sums on the layer's device until _finish moves them.
        assert instance.where == {"cuda" if estimator == "activation" else device}
        assert {d.values.device.type for d in got[accumulate_on].values()} == {device}
    for t in targets:
        torch.testing.assert_close(got["device"][t.name].values.cpu(), got["cpu"][t.name].values, rtol=1e-4, atol=1e-6)


def test_bad_arguments_are_user_errors():
    model, batches = ToyMLP(), toy_batches()
    targets = find_targets(model)
    with pytest.raises(SensloraError, match="activation, fisher, fisher-batch, hutchinson"):
        estimate_diagonals("nope", model, batches, targets)
    with pytest.raises(SensloraError, match="unknown option"):
        estimate_diagonals("activation", model, batches, targets, bogus=1)
    with pytest.raises(SensloraError, match="accumulate_on"):
        estimate_diagonals("activation", model, batches, targets, accumulate_on="gpu")
    with pytest.raises(SensloraError, match="num_probes"):
        estimate_diagonals("hutchinson", model, batches, targets, num_probes=0)
    with pytest.raises(SensloraError, match="labels"):
        estimate_diagonals("fisher", model, [{"input_ids": torch.randn(2, 3)}], targets, progress=False)
