"""Peak memory of a training run, written into ``result.json``.

``peak_memory_mb`` is the growth over the steps after the first: on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated after the first step; on the CPU
(Linux) the peak resident memory (``ru_maxrss``) minus the resident memory after the first step,
with freed heap returned to the OS (glibc ``malloc_trim``) and the peak reset
(``/proc/self/clear_refs``) at that point. Measuring after the first step keeps one-off costs out
(lazily allocated kernels and thread buffers, which a method that ran forward passes before
training, like senslora's allocation, has already paid; AdamW's state, allocated at the first
step). ``peak_memory_total_mb`` is the absolute peak during training (allocated CUDA memory, or the
process's RSS). Without ``/proc`` only the growth of ``ru_maxrss`` from the start of training is
reported, a lower bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

if TYPE_CHECKING:
    from .checkpoint import TrainState


class PeakMemory:
    """Peak memory during training (see the module docstring); :meth:`after_warmup` re-bases it."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = self._reset()
        self.base = self._in_use()
        self.total = 0  # absolute peak before the last re-base
        self.steady = False

    def _reset(self) -> bool:
        """Reset the peak to the memory in use now (CPU: after returning freed heap to the OS)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return reset_peak_rss()

    def _in_use(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        if not self.resettable:
            return self._peak()  # only growth of the peak can be seen
        return rss_bytes()

    def _peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()

    def after_warmup(self) -> None:
        """Measure from now on (after the first step: one-off allocations stay out of the growth)."""
        if self.resettable:
            self.total = max(self.total, self._peak())
            self._reset()
            self.base = self._in_use()
            self.steady = True

    def growth_mb(self) -> float:
        return max(0, self._peak() - self.base) / 2**20

    def total_mb(self) -> float:
        return max(self.total, self._peak()) / 2**20

    def record(self, state: TrainState) -> None:
        """Raise ``state``'s peak memory fields to what was measured so far."""
        state.peak_memory_mb = max(state.peak_memory_mb, self.growth_mb())
        state.peak_memory_total_mb = max(state.peak_memory_total_mb, self.total_mb())

    @property
    def measure(self) -> str:
        what = "cuda max_memory_allocated" if self.cuda else "cpu peak RSS"
        if self.steady:
            return f"{what} over the steps after the first, minus the memory in use after the first step"
        if self.resettable:
            return f"{what} during training minus the memory in use when training starts"
        return f"{what}: growth of ru_maxrss during training (a lower bound)"
