"""The Hessian-diagonal container shared by estimators (producers) and metrics (consumers).

A diagonal of a ``d_out x d_in`` weight matrix has ``N = d_out * d_in`` entries. The activation
estimator's diagonal is the same for every output row, so it is stored *compactly* as a ``d_in``
vector whose every entry occurs ``d_out`` times. Metrics work on the pair (distinct values,
multiplicities) and never materialise the full matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Diagonal:
    """Hessian diagonal of one weight matrix of shape ``(d_out, d_in)``.

    Args:
        values: ``(d_in,)`` float tensor when ``compact`` (entry j repeated for each of the
            ``d_out`` rows), else the full ``(d_out, d_in)`` tensor.
        shape: ``(d_out, d_in)`` of the weight, in ``nn.Linear`` convention (GPT-2 ``Conv1D``
            weights are stored transposed; estimators convert).
        compact: whether ``values`` is the per-column compact form.
        clamped: how many negative entries were clamped to 0 (Hutchinson only).
    """

    values: torch.Tensor
    shape: tuple[int, int]
    compact: bool = False
    clamped: int = 0

    def __post_init__(self) -> None:
        d_out, d_in = self.shape
        expected = (d_in,) if self.compact else (d_out, d_in)
        if tuple(self.values.shape) != expected:
            raise ValueError(f"Diagonal values have shape {tuple(self.values.shape)}, expected {expected}")

    @property
    def numel(self) -> int:
        """N = d_out * d_in, the number of diagonal entries represented."""
        return self.shape[0] * self.shape[1]

    def values_and_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Distinct stored values (1-D, float64, CPU) and how often each occurs in the full diagonal."""
        v = self.values.detach().to("cpu", torch.float64).reshape(-1)
        mult = self.shape[0] if self.compact else 1
        return v, torch.full_like(v, float(mult))

    def dense(self) -> torch.Tensor:
        """The full ``(d_out, d_in)`` diagonal. For tests and small matrices only."""
        if self.compact:
            return self.values.unsqueeze(0).expand(self.shape[0], -1).clone()
        return self.values.clone()


SALIENCIES = ("hessian", "obd")


def weight_saliency(d: Diagonal, weight: torch.Tensor) -> Diagonal:
    """Optimal-Brain-Damage saliency ``h_ij * w_ij^2`` (LeCun et al. 1989) as a full diagonal.

    Under a relative perturbation ``dW = eps * W`` the second-order loss change is
    ``eps^2 / 2 * sum_ij h_ij w_ij^2``, so this weighs each entry's curvature by the size of the
    weight it sits on. ``weight`` is ``(d_out, d_in)`` (nn.Linear convention). The result is dense
    (``d_out x d_in`` fp32, built on the CPU one matrix at a time).
    """
    if tuple(weight.shape) != tuple(d.shape):
        raise ValueError(f"weight of shape {tuple(weight.shape)} for a diagonal of shape {d.shape}")
    w2 = weight.detach().to("cpu", torch.float32).square()
    h = d.values.detach().to("cpu", torch.float32)
    values = w2.mul_(h.unsqueeze(0) if d.compact else h)
    return Diagonal(values=values, shape=d.shape, compact=False, clamped=d.clamped)
