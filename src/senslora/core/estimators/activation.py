"""``activation``: the paper's GPTQ-style diagonal ``h_ij = 2 mean_t x_tj^2``, forward passes only."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..checks import SINK_MODES as SINK_MODES  # re-exported: the sink modes, defined with their check
from ..checks import activation_checks, check_value
from ..diagonal import Diagonal
from ..distributed import Dist
from ..losses import model_inputs
from .base import Estimator, _batch_mask, _batch_size, _reduce_counts, _token_mask, _version

# Squares held at once by the activation hook (fp32 elements): 1 MiB, whatever the batch.
SCRATCH_ELEMENTS = 1 << 18


class ActivationEstimator(Estimator):
    """``h_ij = 2 mean_t x_tj^2`` over calibration tokens (padding masked), compact ``(d_in,)``.

    The hook does one square (into a reused scratch buffer) and one masked column sum per distinct
    input: targets that read the same tensor (q/k/v, gate/up) reuse the previous hook's sums. Its
    ``d_in`` sums stay on the layer's own device during the run (no host sync per layer) and move
    to ``accumulate_on`` at the end.
    """

    name = "activation"
    needs_grad = False
    needs_labels = False
    compact = True
    options = ("sink", "token_trim", "stop_early")

    def __init__(
        self, *, sink: str = "keep", token_trim: float = 0.0, stop_early: bool = True, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.stop_early = bool(stop_early)
        checks = activation_checks()
        check_value("sink", sink, checks)
        check_value("token_trim", token_trim, checks)
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
        rows = x.reshape(-1, x.shape[-1])
        masked = _token_mask(x, self.mask) is not None
        count = self.mask_count if masked else float(rows.shape[0])
        weights = self.row_weights.to(rows.device) if masked else None
        if self.token_trim:
            # Trimming ranks whole rows by their energy: it needs every row's squares at once.
            sq = self._squares(rows)
            weights = weights if weights is not None else sq.new_ones(sq.shape[0])
            weights, count = _trim_rows(sq, weights, count, self.token_trim)
            return torch.mv(sq.T, weights), count
        # Row chunks of at most SCRATCH_ELEMENTS squares: the scratch stays small (a fraction of
        # one activation), and padding (and sink) rows get weight 0 in a matrix-vector product,
        # no copy of the real rows (inf/NaN at padding would surface as the non-finite error).
        # (torch.mv on the transposed view is ~1.5x faster on CPU than ``weights @ sq``.)
        step = max(1, SCRATCH_ELEMENTS // rows.shape[1])
        total = None
        for start in range(0, rows.shape[0], step):
            sq = self._squares(rows[start : start + step])
            part = sq.sum(dim=0) if weights is None else torch.mv(sq.T, weights[start : start + step])
            total = part if total is None else total.add_(part)
        return total, count

    def _squares(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows ** 2`` in fp32, written into a scratch buffer reused across calls (a fresh
        activation-sized tensor per call costs page faults)."""
        buf = self._scratch
        if buf is None or buf.numel() < rows.numel() or buf.device != rows.device:
            buf = self._scratch = torch.empty(rows.numel(), dtype=torch.float32, device=rows.device)
        sq = buf[: rows.numel()].view(rows.shape)
        sq.copy_(rows)
        return sq.square_()

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
