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

Usage::

    diagonals = estimate_diagonals("activation", model, batches, find_targets(model))
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from .diagonal import Diagonal
from .distributed import SINGLE, Dist, current
from .errors import SensloraError
from .losses import LossFn, input_device, model_inputs, move_batch, per_example_loss
from .targets import Target, _is_conv1d

ACCUMULATE_ON = ("cpu", "device")
# ``activation``: keep each sequence's first real token (the paper) or leave it out (``drop``).
SINK_MODES = ("keep", "drop")


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
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    if trainable is not None:
        keep = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch an HF model to eager attention for the duration (SDPA has no double backward on CPU)."""
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original is None or original == "eager":
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise SensloraError(
            f"the hutchinson estimator needs eager attention, the model uses {original!r}; "
            "load it with attn_implementation='eager'"
        )
    try:
        model.set_attn_implementation("eager")
    except (ValueError, ImportError) as exc:
        raise SensloraError(
            f"the hutchinson estimator needs eager attention and switching from {original!r} failed ({exc}); "
            "load the model with attn_implementation='eager'"
        ) from None
    try:
        yield
    finally:
        model.set_attn_implementation(original)


class Estimator(ABC):
    """A Hessian-diagonal estimator.

    Subclasses set ``name`` and implement ``_start`` (state and hooks), ``_step`` (one batch; its
    index in the calibration set is ``self.batch_index``), ``_all_reduce`` (sum the accumulators
    over processes) and ``_finish`` (the diagonals); :meth:`estimate` does everything they share.

    Args:
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example task loss (gradient estimators only).
        seed: seed of the random probes (``hutchinson`` only).
        num_probes: probes per batch (``hutchinson`` only).
    """

    name: ClassVar[str]
    # Whether the estimator backpropagates; if so only the target weights get requires_grad.
    needs_grad: ClassVar[bool] = True

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
        """Extra context for the whole run (e.g. eager attention); none by default."""
        return nullcontext()

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


def probe_seed(seed: int, batch_index: int) -> int:
    """Seed of the Hutchinson probes of calibration batch ``batch_index`` (one stream per batch)."""
    state = np.random.SeedSequence([seed % 2**64, batch_index]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1  # 63 bits: any torch.Generator accepts it


class ActivationEstimator(Estimator):
    """``h_ij = 2 mean_t x_tj^2`` over calibration tokens (padding masked), compact ``(d_in,)``.

    The hook does one square (into a reused scratch buffer) and one masked column sum per distinct
    input: targets that read the same tensor (q/k/v, gate/up) reuse the previous hook's sums. Its
    ``d_in`` sums stay on the layer's own device during the run (no host sync per layer) and move
    to ``accumulate_on`` at the end.
    """

    name = "activation"
    needs_grad = False

    def __init__(
        self, *, sink: str = "keep", token_trim: float = 0.0, stop_early: bool = True, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.stop_early = bool(stop_early)
        from .presets import check_value

        check_value("sink", sink)
        check_value("token_trim", token_trim)
        self.sink = sink
        self.token_trim = float(token_trim)

    def _start(self) -> list[RemovableHandle]:
        # The accumulators are allocated here, before any forward pass, on each weight's device
        # (lazily in the hook only for weights not materialised yet, e.g. offloaded to "meta").
        # Small long-lived tensors created in the middle of a forward pass sit between its large
        # short-lived activations and keep the host allocator from reusing their memory: that cost
        # ~0.25x the model in peak memory on SmolLM2 (measured with ru_maxrss, one batch).
        self.sums: dict[str, torch.Tensor] = {
            t.name: torch.zeros(t.shape[1], dtype=torch.float32, device=t.module.weight.device)
            for t in self.targets
            if t.module.weight.device.type != "meta"
        }
        self.counts = {t.name: 0.0 for t in self.targets}
        self.mask: torch.Tensor | None = None
        self._last: tuple | None = None  # (input, its version, column sums, count) of the last hook
        self._scratch: torch.Tensor | None = None
        # Early stop: nothing after the last target block (final norm, head, logits) is needed.
        # The first batch runs the whole model and counts the hook calls. If every target ran and
        # the last call was the last target (in module order), later batches stop the forward
        # pass right after that target's n-th call (n as in the first batch: a module may run
        # several times per forward). Otherwise (data-dependent routing, unusual call orders)
        # every batch runs to the end.
        self._stop_after: tuple[str, int] | None = None
        self._calls: dict[str, int] = {}
        self._last_called: str | None = None
        return [t.module.register_forward_hook(self._hook(t.name)) for t in self.targets]

    def _count_call(self, name: str) -> None:
        calls = self._calls[name] = self._calls.get(name, 0) + 1
        self._last_called = name
        if self._stop_after == (name, calls):
            raise _StopForward

    def _plan_early_stop(self) -> None:
        """After the first batch: where to stop later forward passes (see ``_start``)."""
        last = self.targets[-1].name
        if all(self._calls.get(t.name, 0) > 0 for t in self.targets) and self._last_called == last:
            self._stop_after = (last, self._calls[last])

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            self._accumulate(name, inputs[0])
            self._count_call(name)

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        last = self._last
        version = _version(x)
        if last is not None and last[0] is x and version is not None and last[1] == version:
            # Same input as the previous target (q/k/v, or gate/up, read one hidden state):
            # its column sums are already computed.
            col_sums, count = last[2], last[3]
        else:
            col_sums, count = self._column_sums(x.detach())
            self._last = (x, version, col_sums, count)
        self.counts[name] += count
        if name in self.sums:
            self.sums[name] += col_sums
        else:
            self.sums[name] = col_sums.clone()  # its own buffer: col_sums may be shared

    def _column_sums(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``sum_t x_tj^2`` over the counted rows of ``x`` (fp32), and how many rows counted."""
        # x_tj^2 in fp32, one row per token (or per example for 2-D inputs), written into a scratch
        # buffer reused across calls (a fresh activation-sized tensor per call costs page faults).
        rows = x.reshape(-1, x.shape[-1])
        buf = self._scratch
        if buf is None or buf.numel() < rows.numel() or buf.device != rows.device:
            buf = self._scratch = torch.empty(rows.numel(), dtype=torch.float32, device=rows.device)
        sq = buf[: rows.numel()].view(rows.shape)
        sq.copy_(rows)
        sq.square_()
        masked = _token_mask(x, self.mask) is not None
        if not masked and not self.token_trim:
            return sq.sum(dim=0), float(sq.shape[0])  # every row counts
        weights = self.row_weights.to(sq.device) if masked else sq.new_ones(sq.shape[0])
        count = self.mask_count if masked else float(sq.shape[0])
        if self.token_trim:
            weights, count = _trim_rows(sq, weights, count, self.token_trim)
        # Padding (and trimmed / sink) rows get weight 0: a matrix-vector product, no copy of the
        # real rows (inf/NaN at padding would surface as the non-finite error).
        # (torch.mv on the transposed view is ~1.5x faster on CPU than ``weights @ sq``.)
        return torch.mv(sq.T, weights), count

    def _step(self, model: nn.Module, batch: dict) -> int:
        # The hooks read the mask of the batch being forwarded.
        self.mask = _batch_mask(batch)
        if self.mask is None and self.sink == "drop" and batch.get("input_ids") is not None:
            self.mask = torch.ones(batch["input_ids"].shape[:2], dtype=torch.bool, device=batch["input_ids"].device)
        if self.mask is not None:
            # 1.0 per counted token, 0.0 per padding position (and per sink token with
            # sink="drop"), flattened like the hook's rows.
            counted = self.mask & ~first_tokens(self.mask) if self.sink == "drop" else self.mask
            self.row_weights = counted.reshape(-1).float()
            self.mask_count = float(counted.sum())
        first = not self._calls and self._last_called is None
        self._calls, self._last_called = {}, None
        try:
            model(**model_inputs(batch))
        except _StopForward:
            pass
        finally:
            self._last = None  # do not keep the batch's last activation alive
        if first and self.stop_early:
            self._plan_early_stop()
        return _batch_size(batch)

    def _all_reduce(self, dist: Dist) -> None:
        for t in self.targets:
            # A layer that never ran in this process's shard contributes zeros.
            if t.name not in self.sums:
                self.sums[t.name] = self._zeros((t.shape[1],))
            dist.all_reduce_(self.sums[t.name])
        names = [t.name for t in self.targets]
        counts = _reduce_counts(dist, [self.num_examples] + [self.counts[n] for n in names])
        self.num_examples = counts[0]
        self.counts = dict(zip(names, counts[1:], strict=True))

    def _finish(self) -> dict[str, Diagonal]:
        self._scratch = None
        out = {}
        for t in self.targets:
            # 2 * mean over the counted tokens (a layer that never ran gets zeros), in place.
            total = (
                self.sums.pop(t.name).to(self.acc_device)
                if t.name in self.sums
                else self._zeros((t.shape[1],))
            )
            values = total.mul_(2.0).div_(max(self.counts[t.name], 1.0))
            out[t.name] = Diagonal(values=values, shape=t.shape, compact=True)
        return out


class _StopForward(Exception):
    """Raised by the activation hooks once every target of this forward pass has been seen."""


def first_tokens(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the first real token of each sequence (left or right padding alike), where
    decoders put their attention sink and its massive activations."""
    return mask & (mask.long().cumsum(dim=1) == 1)


def _trim_rows(
    sq: torch.Tensor, weights: torch.Tensor, count: float, fraction: float
) -> tuple[torch.Tensor, float]:
    """Zero the weights of the ``floor(fraction * count)`` counted rows of largest energy
    ``sum_j sq_tj`` (a trimmed mean over this batch's tokens)."""
    k = int(math.floor(fraction * count))
    if k == 0:
        return weights, count
    energy = torch.mv(sq, torch.ones(sq.shape[1], dtype=sq.dtype, device=sq.device)) * weights
    drop = torch.topk(energy, k, sorted=False).indices
    weights = weights.clone()
    weights[drop] = 0.0
    return weights, count - k


def _example_rows(mask: torch.Tensor) -> list[slice | torch.Tensor]:
    """Per example of a (B, T) bool mask, its real tokens: a slice when they are contiguous (left
    or right padding), else an index tensor. Computed once per batch, shared by every target."""
    rows: list[slice | torch.Tensor] = []
    for m in mask:
        idx = m.nonzero().squeeze(1)
        if idx.numel() == 0:
            rows.append(slice(0, 0))
            continue
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        rows.append(slice(lo, hi) if hi - lo == idx.numel() else idx)
    return rows


class FisherEstimator(Estimator):
    """Empirical Fisher ``mean_n (dL_n/dW)^2`` from true per-example gradients.

    One forward and one backward of ``sum_n L_n`` per batch. For a linear layer the per-example
    gradient is ``sum_t g_nt x_nt^T`` with ``x`` the layer input and ``g`` the gradient at its
    output; a forward hook keeps ``x`` and a tensor hook on the output receives ``g``. Memory: one
    ``d_out x d_in`` matrix at a time (``B`` of them for a module called several times per forward).

    The backward computes no weight gradient: each target's output gets ``+ tap`` (a scalar zero
    leaf, so the values are unchanged bit for bit) and the backward asks for ``dL/d tap`` only.
    Autograd then runs every node between the loss and the target outputs but skips every
    ``dL/dW`` (the per-example products above replace it), so the cost is about one forward and
    backward instead of one forward, one backward and a second weight gradient.
    """

    name = "fisher"

    def _start(self) -> list[RemovableHandle]:
        self.sums = {t.name: self._zeros(t.shape) for t in self.targets}
        self.mask: torch.Tensor | None = None
        self.rows: list[slice | torch.Tensor] | None = None
        # One fp32 (d_out, d_in) scratch per weight shape and device, reused for every example.
        self.scratch: dict[tuple, torch.Tensor] = {}
        self.tap = torch.zeros((), requires_grad=True)
        return [t.module.register_forward_hook(self._hook(t.name)) for t in self.targets]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not output.requires_grad:
                return None
            self.num_calls[name] += 1
            x = inputs[0].detach()
            rows = self.rows if _token_mask(x, self.mask) is not None else None
            # output + 0: the same values, and a path from the loss to the tap through this output.
            tapped = output + self.tap.to(device=output.device, dtype=output.dtype)
            # The gradient w.r.t. this output (a tensor hook sees it before any later in-place op).
            tapped.register_hook(lambda g: self._on_grad(name, x, g.detach(), rows))
            return tapped

        return hook

    def _buffer(self, d_out: int, d_in: int, device: torch.device) -> torch.Tensor:
        key = (d_out, d_in, device)
        if key not in self.scratch:
            self.scratch[key] = torch.empty((d_out, d_in), dtype=torch.float32, device=device)
        return self.scratch[key]

    def _on_grad(
        self, name: str, x: torch.Tensor, g: torch.Tensor, rows: list[slice | torch.Tensor] | None
    ) -> None:
        # Rows of each example: (B, T, d) token inputs, or one row per example for 2-D inputs.
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        g = g.reshape(b, -1, g.shape[-1])
        shared = self.num_calls[name] > 1
        sums = self.sums[name]
        for n in range(b):
            # Only the example's real tokens (padding contributes nothing, and never touches the
            # arithmetic, so inf/NaN in padded rows cannot leak); fp32 copies of those rows only.
            r = rows[n] if rows is not None else slice(None)
            xn, gn = x[n, r].float(), g[n, r].float()
            if shared:
                # A module called several times per forward: gradients add up before squaring.
                pending = self.pending.setdefault(name, [None] * b)
                grad = gn.T @ xn
                pending[n] = grad if pending[n] is None else pending[n].add_(grad)
                continue
            if xn.shape[0] == 0:
                continue
            # Per-example gradient dL_n/dW = g_n^T x_n, (d_out, d_in), into the reused scratch.
            grad = torch.mm(gn.T, xn, out=self._buffer(gn.shape[1], xn.shape[1], xn.device))
            if sums.device == grad.device:
                sums.addcmul_(grad, grad)
            else:
                sums += grad.square_().to(sums.device)

    def _step(self, model: nn.Module, batch: dict) -> int:
        self.mask = _batch_mask(batch)
        self.rows = _example_rows(self.mask) if self.mask is not None else None
        self.num_calls = dict.fromkeys(self.sums, 0)
        self.pending: dict[str, list[torch.Tensor | None]] = {}
        losses = self.loss_fn(model, batch)
        # One backward of sum_n L_n (example n's loss only reaches example n's rows of g), asked
        # for the tap only: no weight gradient is computed.
        torch.autograd.grad(losses.sum(), [self.tap], allow_unused=True)
        for name, grads in self.pending.items():
            for grad in grads:
                if grad is not None:
                    self.sums[name] += grad.square_().to(self.acc_device)
        self.pending = {}
        return int(losses.shape[0])

    def _finish(self) -> dict[str, Diagonal]:
        return _mean_over_examples(self.targets, self.sums, self.num_examples)


def _mean_over_examples(targets: list[Target], sums: dict[str, torch.Tensor], n: int) -> dict[str, Diagonal]:
    """Full diagonals: the accumulated sums divided by the number of examples, in place (the sums
    are taken out of ``sums`` and become the diagonals)."""
    return {t.name: Diagonal(values=sums.pop(t.name).div_(n), shape=t.shape) for t in targets}


def _as_linear(target: Target, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor in (d_out, d_in) convention (Conv1D stores (d_in, d_out))."""
    return tensor.T if _is_conv1d(target.module) else tensor


class FisherBatchEstimator(Estimator):
    """Squared mini-batch gradient ``(dL_batch/dW)^2``, averaged over batches weighted by size.

    NOT the empirical Fisher: the square of a batch mean keeps the cross-example products. A cheap
    variant for comparisons; prefer ``fisher``.
    """

    name = "fisher-batch"

    def _start(self) -> list[RemovableHandle]:
        self.sums = {t.name: self._zeros(t.shape) for t in self.targets}
        return []

    def _step(self, model: nn.Module, batch: dict) -> int:
        losses = self.loss_fn(model, batch)
        b = int(losses.shape[0])
        weights = [t.module.weight for t in self.targets]
        # Gradient of the batch-mean loss.
        grads = torch.autograd.grad(losses.mean(), weights, allow_unused=True)
        for t, grad in zip(self.targets, grads, strict=True):
            if grad is not None:
                # Squared, weighted by the batch size.
                self.sums[t.name] += b * _as_linear(t, grad).float().square().to(self.acc_device)
        return b

    def _finish(self) -> dict[str, Diagonal]:
        return _mean_over_examples(self.targets, self.sums, self.num_examples)


class HutchinsonEstimator(Estimator):
    """Unbiased ``diag(H) ~ mean_z z * (H z)``, Rademacher ``z``, Hessian-vector products by double backward.

    ``H`` is the Hessian of the batch-mean task loss; batches are weighted by their size and each
    gets ``num_probes`` probes drawn from a generator seeded with :func:`probe_seed` ``(seed, batch
    index)``, so a batch gets the same probes whichever process runs it. Negative estimates are
    clamped to 0 at the end (count in ``Diagonal.clamped``). The model runs with eager attention.
    """

    name = "hutchinson"

    def _context(self, model: nn.Module) -> AbstractContextManager:
        return _eager_attention(model)

    def _start(self) -> list[RemovableHandle]:
        self.sums = {t.name: self._zeros(t.shape) for t in self.targets}
        self.generator = torch.Generator()
        return []

    def _probe(self, weight: torch.Tensor) -> torch.Tensor:
        # Rademacher +-1, drawn on the CPU so the stream does not depend on the device.
        z = torch.randint(0, 2, weight.shape, generator=self.generator).mul_(2).sub_(1)
        return z.to(device=weight.device, dtype=weight.dtype)

    def _step(self, model: nn.Module, batch: dict) -> int:
        self.generator.manual_seed(probe_seed(self.seed, self.batch_index))
        losses = self.loss_fn(model, batch)
        b = int(losses.shape[0])
        weights = [t.module.weight for t in self.targets]
        # First backward with graph: the gradient as a function of the weights.
        grads = torch.autograd.grad(losses.mean(), weights, create_graph=True, allow_unused=True)
        # Only gradients that depend on some weight have a non-zero Hessian block.
        live = [i for i, grad in enumerate(grads) if grad is not None and grad.requires_grad]
        for p in range(self.num_probes):
            probes = [self._probe(w) for w in weights]
            if not live:
                continue
            # Second backward: H z = d(g . z)/dW for all targets at once.
            hz = torch.autograd.grad(
                [grads[i] for i in live],
                weights,
                grad_outputs=[probes[i] for i in live],
                retain_graph=p < self.num_probes - 1,
                allow_unused=True,
            )
            for t, z, hz_t in zip(self.targets, probes, hz, strict=True):
                if hz_t is not None:
                    # z * (H z), averaged over probes, weighted by the batch size.
                    est = (z.float() * hz_t.float()) * (b / self.num_probes)
                    self.sums[t.name] += _as_linear(t, est).to(self.acc_device)
        return b

    def _finish(self) -> dict[str, Diagonal]:
        out = {}
        for t in self.targets:
            values = self.sums.pop(t.name).div_(self.num_examples)
            # The true diagonal of a non-convex loss can be negative; the metrics need >= 0.
            negative = int((values < 0).sum())
            out[t.name] = Diagonal(values=values.clamp_(min=0), shape=t.shape, clamped=negative)
        return out


ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (ActivationEstimator, FisherEstimator, FisherBatchEstimator, HutchinsonEstimator)
}


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
        options: extra keyword arguments of the estimator class, if it takes any.

    Returns:
        ``{target.name: Diagonal}`` in ``(d_out, d_in)`` convention.
    """
    if estimator not in ESTIMATORS:
        raise SensloraError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    cls = ESTIMATORS[estimator]
    unknown = sorted(set(options) - set(inspect.signature(cls).parameters))
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
