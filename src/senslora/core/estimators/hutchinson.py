"""``hutchinson``: an unbiased estimate of the true Hessian diagonal, ``mean_z z * (H z)``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..diagonal import Diagonal
from .base import Estimator, _as_linear


def probe_seed(seed: int, batch_index: int) -> int:
    """Seed of the Hutchinson probes of calibration batch ``batch_index`` (one stream per batch)."""
    state = np.random.SeedSequence([seed % 2**64, batch_index]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1  # 63 bits: any torch.Generator accepts it


class HutchinsonEstimator(Estimator):
    """Unbiased ``diag(H) ~ mean_z z * (H z)``, Rademacher ``z``, Hessian-vector products by double backward.

    ``H`` is the Hessian of the batch-mean task loss; batches are weighted by their size and each
    gets ``num_probes`` probes drawn from a generator seeded with :func:`probe_seed` ``(seed, batch
    index)``, so a batch gets the same probes whichever process runs it. Negative estimates are
    clamped to 0 at the end (count in ``Diagonal.clamped``). The model runs with eager attention.
    """

    name = "hutchinson"
    weight_grads = True
    eager_attention = True
    seeded = True

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
