"""Hessian-diagonal estimators (METHOD.md section 3), behind one small interface.

Each estimator runs over calibration batches and returns one :class:`~senslora.core.diagonal.Diagonal`
per target matrix, in ``nn.Linear`` convention ``(d_out, d_in)`` (GPT-2 ``Conv1D`` weights are
stored transposed and are converted here).

- ``activation`` (the paper's, GPTQ-style): forward passes only. The layer-wise reconstruction
  loss of ``y = W x`` has Hessian ``2 X X^T`` per output row, so ``h_ij = 2 mean_t x_tj^2`` over
  calibration tokens, the same for every row: stored compactly as a ``d_in`` vector.
- ``fisher`` (empirical Fisher): ``h = mean_n (dL_n/dW)^2`` with true per-example gradients.
- ``fisher-batch``: ``(dL_batch/dW)^2`` of the mini-batch mean loss, averaged over batches. Cheaper,
  but NOT the empirical Fisher (cross-example terms do not cancel); for comparisons only.
- ``hutchinson``: unbiased estimate of the true diagonal, ``mean_z z * (H z)`` with Rademacher
  probes ``z`` and Hessian-vector products by double backward.

Memory (large models): every estimator keeps exactly one fp32 accumulator per target matrix, a
``d_in`` vector for ``activation`` and a ``(d_out, d_in)`` tensor for the others, on
``accumulate_on`` (``cpu`` by default, or ``device``; ``activation``'s small vectors stay on the
layer's device during the run and move there at the end). The end-of-run reduction over processes
and the final division (and Hutchinson's clamp) work in place on that tensor, which becomes the
returned :class:`~senslora.core.diagonal.Diagonal`: never more than one fp32 diagonal per target matrix.
Each matrix's contribution is computed in its layer's hook as the forward (``activation``,
``fisher``) or backward (``fisher``) pass reaches it, so besides the model's own activations only
one layer's transient tensors are alive: ``fisher`` one per-example gradient (``B`` of them for a
module called several times per forward); ``fisher-batch`` the batch gradient of every target and
``hutchinson`` additionally its probe and Hessian-vector product (model dtype, per batch).

Several processes (``accelerate launch`` / ``torchrun``, see :mod:`senslora.core.distributed`): batch
``i`` is processed by rank ``i % world_size``, each process accumulates its shard, and the
accumulators (sums and example / token counts) are all-reduced once, before the division, so
every process returns the same diagonals. Hutchinson seeds the probes of batch ``i`` from
``(seed, i)``, so they do not depend on which process runs the batch or on the number of processes.

Layout: :mod:`.base` holds the contract (:class:`Estimator`: capability attributes such as
``needs_grad``, ``needs_labels``, ``compact``, ``seeded``, ``options``, and the abstract
``_start`` / ``_step`` / ``_finish``) and the shared run; :mod:`.activation`, :mod:`.fisher`
(``fisher``, ``fisher-batch``) and :mod:`.hutchinson` one family each; :data:`ESTIMATORS`, here,
is the one place names live. Adding an estimator is one new module plus its entry there.

Usage::

    diagonals = estimate_diagonals("activation", model, batches, find_targets(model))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from ..diagonal import Diagonal
from ..errors import SensloraError
from ..losses import LossFn
from ..targets import Target
from .activation import SINK_MODES, ActivationEstimator, first_tokens
from .base import ACCUMULATE_ON, Estimator
from .fisher import FisherBatchEstimator, FisherEstimator
from .hutchinson import HutchinsonEstimator, probe_seed

__all__ = [
    "ACCUMULATE_ON",
    "ESTIMATORS",
    "SINK_MODES",
    "ActivationEstimator",
    "Estimator",
    "FisherBatchEstimator",
    "FisherEstimator",
    "HutchinsonEstimator",
    "estimate_diagonals",
    "estimator_class",
    "first_tokens",
    "probe_seed",
]

#: The registry: every estimator, by its ``name``. A new estimator is a module of this package
#: with an :class:`Estimator` subclass, plus its entry here.
ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (ActivationEstimator, FisherEstimator, FisherBatchEstimator, HutchinsonEstimator)
}


def estimator_class(name: str) -> type[Estimator]:
    """The estimator class registered as ``name`` in :data:`ESTIMATORS` (its capability attributes
    say what a run needs); any other name is a one-line error."""
    if name not in ESTIMATORS:
        raise SensloraError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def estimate_diagonals(
    estimator: str,
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: list[Target],
    *,
    loss_fn: LossFn | None = None,
    device: torch.device | str | None = None,
    accumulate_on: str = "cpu",
    progress: bool = True,
    seed: int = 0,
    num_probes: int = 1,
    distributed: bool | None = None,
    **options: object,
) -> dict[str, Diagonal]:
    """Estimate the Hessian diagonal of every target matrix on calibration batches.

    Args:
        estimator: a key of :data:`ESTIMATORS` (``activation``, ``fisher``, ``fisher-batch``, ``hutchinson``).
        model: any torch / HF model; modes, ``requires_grad`` flags and attention are restored.
        batches: dicts of tensors (``input_ids``, ``attention_mask``, ``labels`` for the gradient
            estimators); moved to ``device`` one at a time.
        targets: from :func:`senslora.core.targets.find_targets`.
        loss_fn: per-example task loss, default :func:`senslora.core.losses.per_example_loss`.
        device: where batches go; ``None`` = the model's device.
        accumulate_on: ``"cpu"`` (default) or ``"device"``: where the fp32 accumulators live (one
            per target matrix, see the module docstring).
        progress: show a tqdm bar over batches (on the main process only).
        seed, num_probes: the ``hutchinson`` probes.
        distributed: ``None`` (default): under a launcher with several processes, shard the batches
            (batch ``i`` on rank ``i % world_size``) and all-reduce the accumulators; every process
            must then call this with the same batches. ``False``: this process does every batch.
        options: the estimator's own keyword arguments, those its class lists in ``options``
            (``activation``: ``sink``, ``token_trim``, ``stop_early``); any other is an error.

    Returns:
        ``{target.name: Diagonal}`` in ``(d_out, d_in)`` convention.
    """
    cls = estimator_class(estimator)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise SensloraError(f"unknown option(s) {', '.join(unknown)} for estimator {estimator!r}")
    instance = cls(loss_fn=loss_fn, seed=seed, num_probes=num_probes, **options)
    return instance.estimate(
        model,
        batches,
        targets,
        device=device,
        accumulate_on=accumulate_on,
        progress=progress,
        distributed=distributed,
    )
