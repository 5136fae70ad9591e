"""Adapter initialisations on any rank pattern: ours (``gradient``) and PEFT's, behind one call.

:data:`INITS` is the one place their names live; :func:`init_peft_model` wraps a model with a
``LoraConfig`` (uniform or per-matrix ranks) and initialises the adapter:

- ``zero``: PEFT's default (random ``A``, ``B = 0``): the model starts unchanged.
- ``gradient`` (ours, GoRA-style; docs/METHOD-NOTES.md "Gradient initialisation"): ``A`` random,
  ``B`` by least squares from the calibration gradient's sketch ``G A^T``
  (:mod:`senslora.core.sketch`), scaled so the initial update ``scaling * B A`` is a normalised
  gradient step of entry size ``init_step``. ``W`` is not changed, so the adapter loads on the
  original model in any trainer.
- ``pissa``, ``olora``: PEFT's (principal singular vectors / QR of ``W``; no data).
- ``corda``: PEFT's (``ipm``: singular vectors of ``W C`` with ``C`` the calibration inputs'
  covariance).
- ``eva``: PEFT's (``A`` from the SVD of the layer inputs); ``rho = 1`` keeps every matrix's rank.
- ``lora-ga``: PEFT's (SVD of the calibration gradient; its ``stable`` scale).

``pissa``, ``olora``, ``corda`` and ``lora-ga`` subtract the initial product from ``W``
(:data:`MUTATES_BASE`): their adapter is only valid on that changed base, so a saved adapter is
converted by PEFT (``path_initial_model_for_weight_conversion``) into a plain LoRA adapter of
twice the rank. Every PEFT initialisation runs PEFT's code; nothing of it is reimplemented here.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import torch
import torch.nn as nn

from .errors import SensloraError
from .losses import IGNORE_INDEX, LossFn, model_inputs, move_batch, offloaded, per_example_loss
from .sketch import GradientSketch, gradient_factors
from .targets import is_linear, quantized

INITS = ("zero", "gradient", "pissa", "olora", "corda", "eva", "lora-ga")
#: PEFT subtracts the initial adapter product from the base weights.
MUTATES_BASE = ("pissa", "olora", "corda", "lora-ga")
#: Need the task loss (labels) on the calibration batches.
NEEDS_LABELS = ("gradient", "lora-ga")
#: Need calibration batches.
NEEDS_DATA = ("gradient", "corda", "eva", "lora-ga")
#: Need a backward pass through every target (no offloaded blocks).
NEEDS_GRAD = ("gradient", "lora-ga")
#: Entry size of the ``gradient`` init's first update (one Adam-like step at learning rate 1e-4); 1e-3
#: raised SmolLM2's chat-qa validation loss (docs/METHOD-NOTES.md, "Scale of the first step").
DEFAULT_STEP = 1e-4
#: EVA cycles over the calibration batches until its SVDs converge; this bounds it.
EVA_MAX_PASSES = 50
_PEFT_NAMES = {"pissa": "pissa", "olora": "olora", "corda": "corda", "eva": "eva", "lora-ga": "lora_ga"}


def check_init(init: str, preset: str | None) -> None:
    """One-line error for an unknown init, or a non-zero init with ``--preset paper``."""
    if init not in INITS:
        raise SensloraError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    if preset == "paper" and init != "zero":
        raise SensloraError(
            f"--preset paper is Sensitivity-LoRA as published, with PEFT's zero init; --init {init} "
            "changes the method: use --preset robust (or no preset) with --init"
        )


def init_blocker(init: str, model: nn.Module, batches: Sequence[Mapping], loss_fn: LossFn | None) -> str | None:
    """Why ``init`` cannot run on ``model`` with these calibration ``batches`` (one phrase), or None
    when it can. Checked before any pass: an init that needs the task loss
    (:data:`NEEDS_LABELS`) needs ``labels`` in every batch unless the caller gives ``loss_fn``; one
    that needs a backward pass (:data:`NEEDS_GRAD`) needs every block on an execution device, and
    every other non-zero init reads the weights of every target, which offloaded blocks do not hold.
    On a quantised model (bitsandbytes 4-/8-bit, QLoRA's base) only ``zero`` and ``gradient`` run:
    the gradient sketch needs no weight, the others need (or change) floating-point weights."""
    if init in NEEDS_LABELS and loss_fn is None and any("labels" not in b for b in batches):
        return "the calibration batches have no labels (the task loss needs them)"
    if init not in ("zero", "gradient") and any(is_linear(m) and quantized(m) for m in model.modules()):
        return "the model's linear weights are quantised (bitsandbytes 4-/8-bit), and only zero and gradient run on them"
    if init != "zero" and offloaded(model):
        if init in NEEDS_GRAD:
            return "the model has offloaded (cpu/disk) blocks, which have no backward pass"
        return "the model has offloaded (cpu/disk) blocks, whose weights it needs on a device"
    return None


# ------------------------------------------------------------------------ the gradient sketch pass
def gradient_sketch(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    targets,
    ranks: Mapping[str, int],
    *,
    seed: int,
    loss_fn: LossFn | None = None,
    device=None,
    accumulate_on: str = "cpu",
    progress: bool = False,
    distributed: bool | None = None,
) -> GradientSketch:
    """One forward and backward pass over ``batches`` filling the sketch ``G A^T`` of every target
    with a rank > 0 (``A`` with ``ranks[name]`` rows); returns the sketch with ``num_examples`` set."""
    from .estimators.fisher import GradientSketchPass

    live = [t for t in targets if ranks.get(t.name, 0) > 0]
    sketch = new_sketch(live, ranks, seed, accumulate_on, device)
    runner = GradientSketchPass(loss_fn=loss_fn, sketch=sketch)
    runner.estimate(
        model, batches, live, device=device, accumulate_on=accumulate_on, progress=progress, distributed=distributed
    )
    sketch.num_examples = runner.num_examples
    return sketch


def new_sketch(targets, rows: Mapping[str, int], seed: int, accumulate_on: str, device) -> GradientSketch:
    """An empty :class:`GradientSketch` for ``targets``, ``rows[name]`` rows of ``A`` each, its
    accumulators on the CPU or (``accumulate_on="device"``) on ``device``."""
    where = "cpu" if accumulate_on == "cpu" or device is None else device
    widths = {t.name: (t.shape[0], t.shape[1], int(rows[t.name])) for t in targets}
    return GradientSketch(widths, seed, where)


def _config_targets(model: nn.Module, config):
    """The target matrices of a ``LoraConfig`` (its ``target_modules``: a regex or names)."""
    from .targets import find_targets

    targets = config.target_modules
    return find_targets(model, targets if isinstance(targets, str) else list(targets))


def config_ranks(model: nn.Module, config) -> dict[str, int]:
    """The rank PEFT will give each target module of ``config``: PEFT's own ``rank_pattern``
    lookup (``get_pattern_key``), else ``config.r``."""
    from peft.utils.other import get_pattern_key

    pattern = config.rank_pattern or {}
    return {
        t.name: int(pattern.get(get_pattern_key(pattern.keys(), t.name), config.r))
        for t in _config_targets(model, config)
    }


# -------------------------------------------------------------------------------- PEFT wrapping
@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """While PEFT wraps a model (or loads an adapter into one): PEFT 0.21's ``PeftModel.__init__``
    reads transformers 5's deprecated ``is_gradient_checkpointing`` property, which warns
    (FutureWarning) on every wrap, with nothing for the user to do. Exactly that warning is
    ignored, and only here; every other one shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


@contextlib.contextmanager
def _converting() -> Iterator[None]:
    """While an adapter of a :data:`MUTATES_BASE` init is saved for conversion: PEFT warns that the
    init changed the base weights and advises the conversion being done, and that the init's own
    config is ignored once ``init_lora_weights=True``; both are about what happens here."""
    with peft_wrapping(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* changes the base weights of the model")
        warnings.filterwarnings("ignore", message=r"`\w+_config` specified but will be ignored")
        yield


def _wrap(model: nn.Module, config, **kwargs):
    from peft import get_peft_model

    with peft_wrapping():
        return get_peft_model(model, config, **kwargs)


def set_factors(peft_model, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy ``(A, B)`` into the ``default`` adapter's ``lora_A`` / ``lora_B`` of each named module."""
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)


def _check_weights_present(model: nn.Module, config, init: str) -> None:
    for t in _config_targets(model, config):
        if t.module.weight.device.type == "meta":
            raise SensloraError(
                f"--init {init} needs the weights of every target, and {t.name} is offloaded; "
                "load the model without a cpu/disk --device-map or use --init zero"
            )


def _token_positions(batch: Mapping[str, torch.Tensor], peft_config) -> torch.Tensor:
    """EVA's tokens: (N, 2) indices (example, position) of the non-padding tokens; in causal-LM
    batches only those with a label other than -100 (PEFT's ``use_label_mask``)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    labels = batch.get("labels")
    # Only token-level labels (causal LM) mask tokens; classification labels are one per example.
    if peft_config.eva_config.use_label_mask and labels is not None and labels.shape == ids.shape:
        mask = mask & (labels != IGNORE_INDEX)
    return mask.nonzero()


class BoundedForward:
    """EVA's forward function: model inputs only (labels never reach the model), failing after
    ``limit`` calls (EVA repeats its passes until the SVDs converge)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls = 0

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> object:
        self.calls += 1
        if self.calls > self.limit:
            raise SensloraError(
                f"EVA's SVD did not converge within {self.limit} forward passes; "
                "use more or larger calibration batches"
            )
        return model(**model_inputs(batch))


def run_eva(peft_model, batches, record: dict | None = None, *, keep_ranks: Mapping[str, int] | None = None) -> None:
    """PEFT's EVA over the calibration batches (bounded passes).

    ``keep_ranks`` (module name -> rank; with ``rho = 1``): every module keeps exactly its rank.
    PEFT's EVA computes one SVD per group of modules that read the same input (q / k / v, gate /
    up) and then swaps ranks inside the group so the module holding the SVD gets the largest; the
    group's components are the same for every member, so each member's first ``r`` components are
    taken from that shared SVD here, and PEFT loads them (``eva_state_dict=``)."""
    from peft import get_eva_state_dict, initialize_lora_eva_weights

    forward = BoundedForward(EVA_MAX_PASSES * len(batches))
    # Every process has all calibration batches (as with one process): no gathering.
    common = dict(forward_fn=forward, prepare_model_inputs_fn=_token_positions, show_progress_bar=False)
    if keep_ranks is None:
        initialize_lora_eva_weights(peft_model, dataloader=batches, gather_distributed_inputs=False, **common)
    else:
        state = get_eva_state_dict(peft_model, dataloader=batches, gather_distributed_inputs=False, **common)
        groups = _same_input_groups(peft_model, batches[0])
        prefix = "base_model.model."
        for key in list(state):
            name = key[len(prefix) :] if key.startswith(prefix) else key
            group = [k for k in state if groups.get(k) is not None and groups.get(k) == groups.get(key)] or [key]
            widest = max(group, key=lambda k: state[k].shape[0])
            state[key] = state[widest][: keep_ranks[name]].clone()
        initialize_lora_eva_weights(peft_model, eva_state_dict=state)
    if record is not None:
        record["eva_forward_passes"] = forward.calls


def _same_input_groups(peft_model, batch) -> dict[str, int]:
    """LoRA module name -> an id shared by the modules that receive the same input tensor."""
    from peft.tuners.lora import LoraLayer

    inputs: dict[str, torch.Tensor] = {}  # kept alive, so no two live inputs share an id
    handles = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):

            def hook(mod, args, _name=name):
                inputs.setdefault(_name, args[0])

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            peft_model(**model_inputs(move_batch(batch, next(peft_model.parameters()).device)))
    finally:
        for h in handles:
            h.remove()
    return {name: id(x) for name, x in inputs.items()}


def _loss_steps(model, batches, loss_fn, device):
    """A callback running forward + backward of each batch's mean task loss, in eval mode (no
    dropout: the gradient is deterministic, as our estimators' are)."""

    def step() -> None:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with warnings.catch_warnings():
                # PEFT counts calls with a full backward hook; only the weights require grad.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for batch in batches:
                    losses = (loss_fn or per_example_loss)(model, move_batch(batch, device))
                    losses.mean().backward()
        finally:
            for m, training in modes:
                m.training = training

    return step


def _forward_examples(model, batches, device):
    """A callback running the model on every calibration example alone, padding removed (PEFT's
    CorDA hooks read one sequence per forward)."""

    def run() -> None:
        with torch.no_grad():
            for batch in batches:
                inputs = model_inputs(batch)
                mask = inputs.get("attention_mask")
                for n in range(inputs["input_ids"].shape[0]):
                    keep = mask[n].bool() if mask is not None else slice(None)
                    one = {k: v[n : n + 1, keep] for k, v in inputs.items() if v.dim() == 2}
                    model(**move_batch(one, device))

    return run


def init_peft_model(
    model: nn.Module,
    config,
    init: str = "zero",
    *,
    batches: Sequence[Mapping[str, torch.Tensor]] = (),
    sketch: GradientSketch | None = None,
    step: float = DEFAULT_STEP,
    loss_fn: LossFn | None = None,
    device=None,
    seed: int = 0,
    record: dict | None = None,
):
    """``model`` wrapped by PEFT with ``config`` and its adapter initialised by ``init``.

    Args:
        config: a ``LoraConfig`` (``rank_pattern`` / ``alpha_pattern`` honoured by every init).
        batches: calibration batches (``corda``, ``eva``, ``lora-ga``; ``gradient`` without ``sketch``).
        sketch: the filled :class:`GradientSketch` (``gradient``); computed from ``batches`` if None.
        step: ``gradient``: entry size of the initial update (see :func:`gradient_factors`).
        seed: ``gradient``: seed of the ``A`` draws (and PEFT's random ``A`` of the other inits).
        record: filled with what the init did (seconds, passes).
    """
    from .losses import input_device

    check_init(init, None)
    record = {} if record is None else record
    if init in NEEDS_DATA and not batches and not (init == "gradient" and sketch is not None):
        raise SensloraError(f"--init {init} needs calibration batches")
    if init != "zero":
        _check_weights_present(model, config, init)
    device = device or input_device(model)
    start = time.perf_counter()
    # PEFT's own random draws (lora_A of zero and eva) follow torch's global RNG, seeded by the caller.
    if init in ("zero", "gradient"):
        if init == "gradient" and sketch is None:
            from .targets import find_targets

            ranks = config_ranks(model, config)
            targets = find_targets(model, list(ranks))
            sketch = gradient_sketch(model, batches, targets, ranks, seed=seed, loss_fn=loss_fn, device=device)
        peft_model = _wrap(model, config if config.init_lora_weights is True else replace(config, init_lora_weights=True))
        if init == "gradient":
            _apply_gradient(peft_model, sketch, step, record)
    elif init == "eva":
        from peft import EvaConfig

        # rho = 1: each matrix keeps its own rank (EVA may only move rank up to rho x its own).
        eva = replace(config, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
        keep = config_ranks(model, config)  # before wrapping: PEFT replaces the target modules
        peft_model = _wrap(model, eva, low_cpu_mem_usage=True)
        run_eva(peft_model, list(batches), record, keep_ranks=keep)
    else:
        peft_model = _mutating_init(model, config, init, batches, loss_fn, device)
    record["init"] = init
    record["init_seconds"] = time.perf_counter() - start
    return peft_model


def mean_gradients(model, targets, batches, loss_fn: LossFn | None = None, device=None) -> dict[str, torch.Tensor]:
    """The mean task-loss gradient of every target weight, ``(d_out, d_in)`` fp32 on the CPU: a
    full gradient copy of the targets (GoRA's importance needs it; ``--init gradient`` does not).
    Eval mode, grads only for the targets; modes and flags restored."""
    from .estimators.base import _as_linear, _estimation_mode

    if any(t.quantized for t in targets):
        raise SensloraError("the mean weight gradient needs floating-point weights, and the model's are quantised")
    weights = [t.module.weight for t in targets]
    sums = {t.name: torch.zeros(t.shape, dtype=torch.float32) for t in targets}
    count = 0
    with _estimation_mode(model, weights), torch.enable_grad():
        for batch in batches:
            losses = (loss_fn or per_example_loss)(model, move_batch(batch, device))
            grads = torch.autograd.grad(losses.sum(), weights, allow_unused=True)
            for t, grad in zip(targets, grads, strict=True):
                if grad is not None:
                    sums[t.name] += _as_linear(t, grad).float().cpu()
            count += int(losses.shape[0])
    if count == 0:
        raise SensloraError("the calibration set is empty; pass at least one labelled example")
    return {name: total / count for name, total in sums.items()}


def save_initial_adapter(peft_model, folder) -> None:
    """Save the freshly initialised adapter of a :data:`MUTATES_BASE` init into ``folder`` (PEFT's
    way: with ``init_lora_weights=True`` in its config), for the conversion at the end of training
    (``save_pretrained(..., path_initial_model_for_weight_conversion=folder)``)."""
    config = peft_model.peft_config["default"]
    original = config.init_lora_weights
    config.init_lora_weights = True
    try:
        with _converting():
            peft_model.save_pretrained(str(folder))
    finally:
        config.init_lora_weights = original


def save_converted(peft_model, out_dir, initial) -> None:
    """Save a trained adapter of a :data:`MUTATES_BASE` init as a plain LoRA adapter on the original
    base model (PEFT's conversion against the ``initial`` adapter folder: rank 2r, ``[A; A_0]``
    and ``[B, -B_0]``). PEFT 0.21's conversion keeps only the ``lora_A`` / ``lora_B`` tensors and
    drops every other saved tensor (a task head in ``modules_to_save``); they are added back here."""
    from pathlib import Path

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    with _converting():  # the conversion loads the initial adapter into the model
        peft_model.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=str(initial))
    weights = Path(out_dir) / "adapter_model.safetensors"
    saved = load_file(str(weights))
    full = get_peft_model_state_dict(peft_model)
    dropped = {k: v.detach().cpu().contiguous() for k, v in full.items() if k not in saved and "lora_" not in k}
    if dropped:
        save_file({**saved, **dropped}, str(weights), metadata={"format": "pt"})
    # A plain LoRA adapter now: its config says so (no init sub-config left to warn about on load).
    config_file = Path(out_dir) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(init_lora_weights=True, corda_config=None, lora_ga_config=None, eva_config=None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _mutating_init(model, config, init, batches, loss_fn, device):
    name = _PEFT_NAMES[init]
    if init in ("pissa", "olora"):
        return _wrap(model, replace(config, init_lora_weights=name))
    if init == "lora-ga":
        from peft.tuners.lora import LoraGAConfig, preprocess_loraga

        cfg = replace(config, init_lora_weights=name, lora_ga_config=LoraGAConfig())
        preprocess_loraga(model, cfg, _loss_steps(model, batches, loss_fn, device))
        return _wrap(model, cfg)
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    cfg = replace(config, init_lora_weights=name, corda_config=CordaConfig(corda_method="ipm"))
    preprocess_corda(model, cfg, run_model=_forward_examples(model, batches, device))
    return _wrap(model, cfg)


def _apply_gradient(peft_model, sketch: GradientSketch, step: float, record: dict) -> None:
    from .peft_bridge import peft_ranks, peft_scalings

    ranks = peft_ranks(peft_model)
    scalings = peft_scalings(peft_model)
    missing = sorted(n for n in ranks if n not in sketch.sums or sketch.sums[n].shape[1] < ranks[n])
    if missing:
        raise SensloraError(f"the gradient sketch has no columns for {missing[0]} at rank {ranks[missing[0]]}")
    factors = gradient_factors(sketch.mean(sketch.num_examples), {n: sketch.a(n) for n in ranks}, ranks, scalings, step)
    set_factors(peft_model, factors)
    record["init_step"] = step
    record["init_examples"] = sketch.num_examples
