"""The fine-tuning method interface and registry.

A method turns a loaded base model into the model that is trained (PEFT LoRA, adapters, full
fine-tuning, ...), optionally acts at fixed points of the training loop, and saves / reloads what
it trained. One shared test suite (tests/test_methods.py) runs over every registered method.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ...core.errors import SensloraError
from ...core.inits import peft_wrapping as peft_wrapping  # re-exported: methods wrap through it
from ...data.models import HEAD_MODULES


@dataclass
class MethodContext:
    """Everything a method may need besides the model.

    Attributes:
        avg_rank: the budget: uniform LoRA of this rank on the target matrices is the reference.
        lora_alpha: reference alpha of uniform LoRA (scaling alpha / r).
        lora_dropout: dropout on LoRA / adapter inputs.
        task_kind: ``classification`` | ``regression`` | ``causal-lm``.
        calibration_batches: batches for data-driven methods (senslora, eva, cka); from the train split.
        total_steps: optimizer steps of the whole run (AdaLoRA's schedule needs it).
        seed: run seed.
        options: method options from the CLI (estimator, score, fusion, strategy, topk_fraction,
            alpha, layer_ratio, layers, target_modules, ...).
        out_dir: the run folder (methods may write e.g. ``allocation/`` into it).
        device: torch device of the model.
    """

    avg_rank: float = 4
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    task_kind: str = "classification"
    calibration_batches: list[dict] = field(default_factory=list)
    total_steps: int = 100
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    device: Any = "cpu"


class Method:
    """Base class: override :meth:`prepare`; every other hook has a default (mostly: do nothing).

    The training loop calls, in this order: :meth:`prepare` once; per optimizer step
    :meth:`on_step_begin`, the forward pass plus :meth:`extra_loss`, backward,
    :meth:`on_optimizer_step`; :meth:`on_eval` before every evaluation; :meth:`state_dict` at every
    checkpoint and :meth:`load_state_dict` on a resume; :meth:`budget_parameter_count` for
    ``result.json``; :meth:`save` at the end. ``evaluate`` calls :meth:`load` (and :meth:`merge`).
    """

    name: ClassVar[str] = ""
    #: True when the trained model is a PEFT model saved with ``save_pretrained``.
    is_peft: ClassVar[bool] = True
    #: False when the trained model cannot be folded into a plain model (``evaluate --merge``).
    mergeable: ClassVar[bool] = True
    #: Training options this method always sets (they override the CLI's defaults), e.g. the
    #: ``cka`` method is ``lora`` with ``layer_select="cka"``.
    implied_options: ClassVar[dict[str, Any]] = {}
    #: Options this method reads besides the common ones (see :mod:`senslora.training.options`).
    option_keys: ClassVar[tuple[str, ...]] = ()
    #: Honours the ``init`` option (an adapter initialisation, :mod:`senslora.core.inits`); a
    #: method that does not refuses any init but ``zero``.
    reads_init: ClassVar[bool] = False

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}  # method-specific facts written into result.json
        #: The initial adapter of an init that changes the base weights (PiSSA, OLoRA, CorDA,
        #: LoRA-GA; set by :func:`initialise`): :meth:`save` converts the trained adapter against it
        #: into a plain LoRA adapter on the original base model (PEFT's conversion).
        self.initial_adapter: Path | None = None

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Return the model to train, with exactly the method's parameters trainable."""
        raise NotImplementedError

    def init_for(self, options: Mapping[str, Any]) -> str | None:
        """The adapter init a run with these ``options`` uses (what it records as
        ``method_record.init``), or None for a method that reads no ``init`` option. The base rule:
        the ``init`` option, else PEFT's ``zero``."""
        return (options.get("init") or "zero") if self.reads_init else None

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        """Before the forward pass of optimizer step ``step`` (0-based)."""

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """After ``optimizer.step()`` and before ``zero_grad()`` (AdaLoRA's update_and_allocate)."""

    def on_eval(self, model: nn.Module) -> None:
        """Before evaluation (e.g. DyLoRA evaluates at full rank)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to every training step's task loss (AdaLoRA's orthogonality penalty), or
        None: nothing to add (the default)."""
        return None

    def budget_parameter_count(self, model: nn.Module) -> int:
        """The parameter count compared with uniform LoRA's budget (``budget_params``). Default:
        :func:`adapter_parameter_count`, the trainable parameters outside the task head."""
        return adapter_parameter_count(model)

    def state_dict(self) -> dict[str, Any] | None:
        """Run state outside the model's weights, saved in every checkpoint (``method.pt``), or None
        when the method has none (the default; no ``method.pt`` is written)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on a resume, after :meth:`prepare` and the trained weights.
        Default: nothing to restore."""

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Save what was trained into ``out_dir`` (PEFT: ``save_pretrained``; converted against
        :attr:`initial_adapter` when the init changed the base weights)."""
        if self.initial_adapter is not None:
            from ...core.inits import save_converted

            save_converted(model, out_dir, self.initial_adapter)
            return
        model.save_pretrained(str(out_dir))

    def load(self, base_model: nn.Module, adapter_dir: Path, ctx: MethodContext) -> nn.Module:
        """Rebuild the trained model from a fresh base model and :meth:`save`'s folder."""
        from peft import PeftModel

        with peft_wrapping():
            return PeftModel.from_pretrained(base_model, str(adapter_dir))

    def merge(self, model: nn.Module) -> nn.Module:
        """The trained model (from :meth:`load`) as a plain model, with what was trained folded in.
        Default: PEFT's ``merge_and_unload``; a method that is not PEFT overrides this, or sets
        :attr:`mergeable` to False."""
        if not self.is_peft:
            raise SensloraError(f"method {self.name} cannot be merged into the base model")
        return model.merge_and_unload()


def wrap_peft(model: nn.Module, config: Any, **kwargs: Any) -> nn.Module:
    """``peft.get_peft_model`` under :func:`peft_wrapping`."""
    from peft import get_peft_model

    with peft_wrapping():
        return get_peft_model(model, config, **kwargs)


def initialise(method: Method, model: nn.Module, config: Any, init: str, ctx: MethodContext, **kwargs: Any):
    """``model`` wrapped with ``config`` and initialised by ``init``
    (:func:`senslora.core.inits.init_peft_model` on the calibration batches), facts into
    ``method.record``. For an init that changes the base weights the initial adapter is kept in a
    temporary folder, so :meth:`Method.save` writes a plain LoRA adapter (a resumed run re-runs
    the init, which is deterministic, and keeps a fresh copy)."""
    import tempfile

    from ...core.inits import MUTATES_BASE, init_peft_model, save_initial_adapter

    peft_model = init_peft_model(
        model, config, init, batches=ctx.calibration_batches, device=ctx.device, seed=ctx.seed, record=method.record, **kwargs
    )
    if init in MUTATES_BASE:
        method._initial_tmp = tempfile.TemporaryDirectory(prefix="senslora-initial-")
        method.initial_adapter = Path(method._initial_tmp.name) / "initial"
        save_initial_adapter(peft_model, method.initial_adapter)
    return peft_model


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


# Modules that register methods when imported (kept lazy: they import peft / transformers).
_MODULES = ("lora", "adalora", "dylora", "adapters", "eva", "full", "related", "gora", "loraga", "pissa")


def load_all() -> None:
    """Import every method module, so that :data:`METHODS` lists them all (a module whose optional
    dependency is missing is skipped)."""
    package = __name__.rpartition(".")[0]
    for mod in _MODULES:
        try:
            importlib.import_module(f"{package}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{mod}":
                raise


def get_method(name: str) -> Method:
    load_all()
    if name not in METHODS:
        raise SensloraError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]()


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the task head's parameters (trained by every method, excluded from adapter counts)."""
    # The shared task-head list plus ``lm_head``, which data.models leaves out on purpose (it is
    # the pretrained output layer, frozen by the adapter methods): ``full`` fine-tuning of an
    # untied causal LM trains it, and those parameters count as head here, not as adapter budget.
    heads = (*HEAD_MODULES, "lm_head")
    return [n for n, _ in model.named_parameters() if any(part in heads for part in n.split("."))]


def adapter_parameter_count(model: nn.Module) -> int:
    """Trainable parameters excluding the task head: what budgets are matched on."""
    heads = set(head_parameter_names(model))
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in heads)
