"""``fisher`` (empirical Fisher from per-example gradients) and ``fisher-batch`` (squared
mini-batch gradients, for comparisons)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..diagonal import Diagonal
from ..distributed import Dist
from ..errors import SensloraError
from ..sketch import GradientSketch
from .base import Estimator, _as_linear, _batch_mask, _mean_over_examples, _reduce_counts, _token_mask


def _received(g: torch.Tensor | None, name: str) -> torch.Tensor:
    """The gradient at a target's output; None when a layer after it ran without autograd."""
    if g is None:
        raise SensloraError(
            f"no gradient reached {name}: a layer after it ran without autograd (e.g. a bitsandbytes 4-bit layer "
            "repacked for CPU inference before senslora saw the model); load the model anew, or allocate on a GPU"
        )
    return g.detach()


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

    ``sketch`` (a :class:`~senslora.core.sketch.GradientSketch`): the same hooks also accumulate
    ``G A^T`` of every target for ``--init gradient``, so the initialisation shares this pass.
    """

    name = "fisher"
    options = ("sketch",)
    #: Accumulate the squared per-example gradients (the diagonal); off for the sketch-only pass.
    squares: bool = True

    def __init__(self, *, sketch: GradientSketch | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sketch = sketch

    def _start(self) -> list[RemovableHandle]:
        self.sums = {t.name: self._zeros(t.shape) for t in self.targets} if self.squares else {}
        self.mask: torch.Tensor | None = None
        self.rows: list[slice | torch.Tensor] | None = None
        # One fp32 (d_out, d_in) scratch per weight shape and device, reused for every example.
        self.scratch: dict[tuple, torch.Tensor] = {}
        self.tap = torch.zeros((), requires_grad=True)
        return [t.module.register_forward_hook(self._hook(t.name)) for t in self.targets]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            # Grad mode, not output.requires_grad: a quantised target's output needs no gradient
            # when nothing before it does (no weight of it requires one); the tap gives it one.
            if not torch.is_grad_enabled():
                return None
            self.num_calls[name] += 1
            x = inputs[0].detach()
            mask = _token_mask(x, self.mask)
            rows = self.rows if mask is not None else None
            # output + 0: the same values, and a path from the loss to the tap through this output.
            tapped = output + self.tap.to(device=output.device, dtype=output.dtype)
            # The gradient w.r.t. this output (a tensor hook sees it before any later in-place op).
            tapped.register_hook(lambda g: self._on_grad(name, x, _received(g, name), rows, mask))
            return tapped

        return hook

    def _buffer(self, d_out: int, d_in: int, device: torch.device) -> torch.Tensor:
        key = (d_out, d_in, device)
        if key not in self.scratch:
            self.scratch[key] = torch.empty((d_out, d_in), dtype=torch.float32, device=device)
        return self.scratch[key]

    def _on_grad(
        self,
        name: str,
        x: torch.Tensor,
        g: torch.Tensor,
        rows: list[slice | torch.Tensor] | None,
        mask: torch.Tensor | None = None,
    ) -> None:
        if self.sketch is not None:
            self.sketch.add(name, x, g, mask)
        if not self.squares:
            return
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
        self.num_calls = {t.name: 0 for t in self.targets}
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

    def _all_reduce(self, dist: Dist) -> None:
        for total in self.sums.values():  # empty in the sketch-only pass
            dist.all_reduce_(total)
        self.num_examples = _reduce_counts(dist, [self.num_examples])[0]
        if self.sketch is not None:
            self.sketch.all_reduce(dist)

    def _finish(self) -> dict[str, Diagonal]:
        return _mean_over_examples(self.targets, self.sums, self.num_examples)


class GradientSketchPass(FisherEstimator):
    """One forward and backward per batch that only fills a :class:`GradientSketch` (no diagonal):
    the extra pass of ``--init gradient`` after a forward-only estimator. Not a Hessian estimator,
    so not in the registry; :func:`senslora.core.inits.gradient_sketch` runs it."""

    name = "gradient"
    squares = False

    def _finish(self) -> dict[str, Diagonal]:
        return {}


class FisherBatchEstimator(Estimator):
    """Squared mini-batch gradient ``(dL_batch/dW)^2``, averaged over batches weighted by size.

    NOT the empirical Fisher: the square of a batch mean keeps the cross-example products. A cheap
    variant for comparisons; prefer ``fisher``.
    """

    name = "fisher-batch"
    weight_grads = True

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
