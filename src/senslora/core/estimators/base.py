"""The estimator contract (:class:`Estimator`) and what every estimator shares.

A new estimator is one module in this package with a subclass of :class:`Estimator` that sets
``name`` and the capability attributes that differ from the defaults, and implements ``_start``,
``_step`` and ``_finish``; registering the class in :data:`senslora.core.estimators.ESTIMATORS`
(the one place names live) makes it available to :func:`~senslora.core.estimators.estimate_diagonals`,
the presets and the CLI.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import ClassVar

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from ..diagonal import Diagonal
from ..distributed import SINGLE, Dist, current
from ..errors import SensloraError
from ..losses import LossFn, input_device, move_batch, per_example_loss
from ..targets import Target, _is_conv1d

ACCUMULATE_ON = ("cpu", "device")


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    if "input_ids" in batch:
        return int(batch["input_ids"].shape[0])
    return int(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0])


def _version(x: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None for inference-mode tensors, which have none)."""
    try:
        return x._version
    except RuntimeError:
        return None


def _token_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, T) bool mask of real tokens for a (B, T, d) layer input, or None if every row counts.

    Inputs without a token dimension (2-D, one row per example) and inputs whose (B, T) does not
    match the batch's attention mask count every row.
    """
    if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return None
    return mask


def _batch_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The batch's (B, T) attention mask as bool, or None (no mask, or not a 2-D padding mask)."""
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None and mask.dim() == 2 else None


@contextmanager
def _estimation_mode(model: nn.Module, trainable: list[nn.Parameter] | None) -> Iterator[None]:
    """Eval mode (dropout off) and, if ``trainable`` is given, grads only for those parameters.

    Every module's ``training`` flag and every parameter's ``requires_grad`` are restored on exit.

    bitsandbytes' 4-bit layers on a CPU with AVX512-BF16 repack their weight, in eval mode and
    without input gradients, for an inference kernel that has no backward; once repacked, no
    gradient crosses them again. The repacking is switched off for the duration (its
    ``support_avx512bf16_for_cpu`` flag), so a forward-only pass (the activation estimator) does
    not break the gradient passes after it (the gradient init, ``fisher``).
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    packing = [(m, m.support_avx512bf16_for_cpu) for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for m, _ in packing:
        m.support_avx512bf16_for_cpu = False
    model.eval()
    if trainable is not None:
        keep = {id(p) for p in trainable}
        for p in model.parameters():
            # A quantised weight (packed integers) cannot require grad; the tapped passes
            # (``fisher``, the gradient sketch) do not need it to.
            p.requires_grad_(id(p) in keep and p.is_floating_point())
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
        for m, packs in packing:
            m.support_avx512bf16_for_cpu = packs


@contextmanager
def _eager_attention(model: nn.Module, estimator: str) -> Iterator[None]:
    """Switch an HF model to eager attention for the duration (SDPA has no double backward on CPU)."""
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original is None or original == "eager":
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise SensloraError(
            f"the {estimator} estimator needs eager attention, the model uses {original!r}; "
            "load it with attn_implementation='eager'"
        )
    try:
        model.set_attn_implementation("eager")
    except (ValueError, ImportError) as exc:
        raise SensloraError(
            f"the {estimator} estimator needs eager attention and switching from {original!r} failed ({exc}); "
            "load the model with attn_implementation='eager'"
        ) from None
    try:
        yield
    finally:
        model.set_attn_implementation(original)


class Estimator(ABC):
    """A Hessian-diagonal estimator: the contract every estimator of the registry keeps.

    A subclass sets ``name`` (its key in :data:`senslora.core.estimators.ESTIMATORS`), overrides
    the capability attributes below where they differ from the defaults, and implements the three
    abstract methods: ``_start`` (accumulators and hooks), ``_step`` (one batch; its index in the
    calibration set is ``self.batch_index``) and ``_finish`` (the diagonals, in place from the
    accumulators). ``_all_reduce`` (sum the accumulators over processes) has a default for
    accumulators kept in ``self.sums``, one per target. :meth:`estimate` does everything they
    share: modes and ``requires_grad`` flags (restored), grad mode, the context, hooks removed,
    sharding, the empty-set and non-finite checks.

    Args:
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example task loss (estimators with
            ``needs_labels``).
        seed: seed of the random probes (estimators with ``seeded``).
        num_probes: probes per batch (``hutchinson``).
    """

    #: Key in the registry, and the name in messages and progress bars.
    name: ClassVar[str]
    #: Backpropagates: runs with grad mode on, and only the target weights get ``requires_grad``;
    #: otherwise it runs under ``torch.no_grad`` (forward passes only, so offloaded models work).
    needs_grad: ClassVar[bool] = True
    #: Needs the task loss, hence ``labels`` in every batch.
    needs_labels: ClassVar[bool] = True
    #: Differentiates the target weights themselves (``autograd.grad`` w.r.t. them), so it refuses
    #: quantised targets (bitsandbytes 4-/8-bit: packed integers, no gradient). ``fisher`` does not:
    #: it takes each target's output gradient through a tap and never asks for ``dL/dW``.
    weight_grads: ClassVar[bool] = False
    #: Backpropagates twice through attention: the model runs with eager attention.
    eager_attention: ClassVar[bool] = False
    #: Returns compact ``(d_in,)`` diagonals (one value per input column, shared by every row);
    #: otherwise full ``(d_out, d_in)`` ones.
    compact: ClassVar[bool] = False
    #: Every returned entry is >= 0.
    nonnegative: ClassVar[bool] = True
    #: The result depends on ``seed``; otherwise ``seed`` is ignored and the result is the same.
    seeded: ClassVar[bool] = False
    #: Extra keyword arguments of the constructor, passed on by ``estimate_diagonals(**options)``.
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, loss_fn: LossFn | None = None, seed: int = 0, num_probes: int = 1) -> None:
        if num_probes < 1:
            raise SensloraError(f"num_probes must be >= 1, got {num_probes}")
        self.loss_fn = loss_fn or per_example_loss
        self.seed = seed
        self.num_probes = num_probes

    def estimate(
        self,
        model: nn.Module,
        batches: Iterable[Mapping[str, torch.Tensor]],
        targets: list[Target],
        *,
        device: torch.device | str | None = None,
        accumulate_on: str = "cpu",
        progress: bool = True,
        distributed: bool | None = None,
    ) -> dict[str, Diagonal]:
        """One diagonal per target (keys = ``Target.name``); the model is left as it was found.

        ``distributed``: ``None`` (default) shards the batches over the processes when there are
        several (:func:`senslora.core.distributed.current`); ``False`` processes every batch here.
        """
        if accumulate_on not in ACCUMULATE_ON:
            raise SensloraError(
                f"accumulate_on must be one of {', '.join(ACCUMULATE_ON)}, got {accumulate_on!r}"
            )
        device = torch.device(device) if device is not None else input_device(model)
        self.targets = list(targets)
        self.acc_device = device if accumulate_on == "device" else torch.device("cpu")
        self.num_examples = 0
        dist: Dist = current() if distributed is not False else SINGLE
        first = next((t for t in self.targets if t.quantized), None) if self.weight_grads else None
        if first is not None:
            raise SensloraError(
                f"the {self.name} estimator differentiates every target weight, and {first.name} is quantised "
                f"({first.module.weight.dtype}, e.g. a bitsandbytes 4-bit model); use --estimator activation or fisher"
            )
        trainable = [t.module.weight for t in self.targets] if self.needs_grad else None
        grad_mode = torch.enable_grad() if self.needs_grad else torch.no_grad()
        with _estimation_mode(model, trainable), grad_mode, self._context(model):
            handles = self._start()
            try:
                bar = tqdm(
                    batches,
                    desc=f"{self.name} diagonal",
                    unit="batch",
                    disable=not progress or not dist.is_main,
                )
                for index, batch in enumerate(bar):
                    if dist.enabled and not dist.owns(index):
                        continue
                    self.batch_index = index
                    self.num_examples += self._step(model, move_batch(batch, device))
            finally:
                for handle in handles:
                    handle.remove()
        if dist.enabled:
            # Once, before _finish divides: every process then holds the sums over all batches.
            self._all_reduce(dist)
        if self.num_examples == 0:
            raise SensloraError("empty calibration set: the estimator saw no batch")
        diagonals = self._finish()
        for name, diagonal in diagonals.items():
            if not torch.isfinite(diagonal.values).all():
                raise SensloraError(
                    f"{self.name} estimator produced a non-finite Hessian diagonal in {name}; check dtype / calibration data"
                )
        return diagonals

    def _context(self, model: nn.Module) -> AbstractContextManager:
        """Extra context for the whole run: eager attention where ``eager_attention`` is set."""
        return _eager_attention(model, self.name) if self.eager_attention else nullcontext()

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.acc_device)

    def _all_reduce(self, dist: Dist) -> None:
        """Sum the accumulators (``self.sums``, one per target) and the example count over processes."""
        for t in self.targets:
            dist.all_reduce_(self.sums[t.name])
        self.num_examples = _reduce_counts(dist, [self.num_examples])[0]

    @abstractmethod
    def _start(self) -> list[RemovableHandle]:
        """Reset the accumulators and register hooks (returned so they are always removed)."""

    @abstractmethod
    def _step(self, model: nn.Module, batch: dict) -> int:
        """Process one batch already on the device; return its number of examples."""

    @abstractmethod
    def _finish(self) -> dict[str, Diagonal]:
        """The diagonals from the accumulators (in place: the accumulators become the diagonals)."""


def _reduce_counts(dist: Dist, counts: list[float]) -> list[float]:
    """Counts summed over processes (float64: exact for any realistic number of tokens)."""
    total = dist.all_reduce_(torch.tensor(counts, dtype=torch.float64))
    return [type(c)(v) for c, v in zip(counts, total.tolist(), strict=True)]


def _mean_over_examples(targets: list[Target], sums: dict[str, torch.Tensor], n: int) -> dict[str, Diagonal]:
    """Full diagonals: the accumulated sums divided by the number of examples, in place (the sums
    are taken out of ``sums`` and become the diagonals)."""
    return {t.name: Diagonal(values=sums.pop(t.name).div_(n), shape=t.shape) for t in targets}


def _as_linear(target: Target, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor in (d_out, d_in) convention (Conv1D stores (d_in, d_out))."""
    return tensor.T if _is_conv1d(target.module) else tensor
