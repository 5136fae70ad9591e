"""The gradient sketch: ``G_w A_w^T`` of every target matrix, without a gradient copy of the model.

``--init gradient`` (:mod:`senslora.core.inits`) needs, per target matrix ``W`` (``d_out x d_in``)
and its allocated rank ``r``, the least-squares factor ``B = G A^T (A A^T)^{-1}`` of the
calibration set's mean task-loss gradient ``G`` for a random ``A`` (``r x d_in``). ``G`` itself is
never formed: for a linear layer ``G = sum_tokens g x^T`` (``x`` its input, ``g`` the gradient at its
output), so ``G A^T = sum_tokens g (A x)^T`` accumulates in the backward hooks at ``d_out x r``
floats per matrix, about the size of the LoRA adapter (:class:`GradientSketch`).

``A`` is drawn once per matrix at the largest rank it may get (``k`` rows), from a generator
seeded by ``(seed, matrix name)``; rows are drawn in order, so the first ``r`` rows of the draw are
exactly the draw at rank ``r``, and the sketch's first ``r`` columns are ``G A_r^T`` for every
``r <= k``. That is what lets the ``fisher`` estimator's pass also fill the sketch before the
ranks are known. The distribution is PEFT's default for ``lora_A`` (Kaiming-uniform with
``a = sqrt(5)``: U(-1/sqrt(d_in), 1/sqrt(d_in))), so ``A`` has the scale LoRA training expects.

Pure tensor code; written by hand because no maintained library accumulates a projected
gradient in hooks (PEFT's LoRA-GA stores the full gradient of every target).
"""

from __future__ import annotations

import math
import zlib

import torch

from .distributed import Dist


def draw_a(name: str, rows: int, d_in: int, seed: int) -> torch.Tensor:
    """The random ``A`` of matrix ``name``: ``rows x d_in``, float32 on the CPU, U(-1/sqrt(d_in),
    1/sqrt(d_in)), from a generator seeded by ``seed`` and the name (so it does not depend on the
    order of the targets or on the process). Its first ``r`` rows equal ``draw_a(name, r, ...)``."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    bound = 1.0 / math.sqrt(d_in)
    return torch.rand((rows, d_in), generator=generator, dtype=torch.float32).mul_(2 * bound).sub_(bound)


def least_squares_b(sketch: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``B`` minimising ``||B A - G||_F`` from ``sketch = G A^T``: ``B = G A^T (A A^T)^{-1}``.

    ``sketch`` is ``d_out x r`` and ``a`` is ``r x d_in`` (rank ``r <= d_in``, so ``A A^T`` is
    invertible for a random ``A``). With ``r = d_in``, ``B A = G`` exactly."""
    gram = a.double() @ a.double().T
    return torch.linalg.solve(gram, sketch.double().T).T.to(torch.float32)


class GradientSketch:
    """Accumulates ``G_w A_w^T`` for every target matrix in the hooks of a backward pass.

    Args:
        widths: per target name, ``(d_out, d_in, k)``: the matrix shape and the number of rows of
            its ``A`` (the largest rank it may get).
        seed: seed of the ``A`` draws.
        device: where the accumulators live (fp32, ``d_out x k`` each).
    """

    def __init__(self, widths: dict[str, tuple[int, int, int]], seed: int, device: torch.device | str = "cpu"):
        self.seed = seed
        self.device = torch.device(device)
        self.widths = dict(widths)
        self.sums = {
            name: torch.zeros((d_out, k), dtype=torch.float32, device=self.device)
            for name, (d_out, _, k) in widths.items()
        }
        #: Examples summed so far (over every process, once the pass is over).
        self.num_examples = 0

    def a(self, name: str) -> torch.Tensor:
        """Matrix ``name``'s ``A`` (all ``k`` rows), drawn again from its seeded generator: the sketch
        holds only its accumulators, so its memory is ``d_out x k`` per matrix, not ``A`` as well."""
        _, d_in, k = self.widths[name]
        return draw_a(name, k, d_in, self.seed)

    def add(self, name: str, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one call's ``g^T (x A^T)`` (= ``G A^T`` of this call's gradient) for matrix ``name``.

        ``x`` is the layer input and ``g`` the gradient at its output, ``(..., d_in)`` and
        ``(..., d_out)`` with the same leading dimensions; ``mask`` (those leading dimensions, bool)
        keeps only real tokens, so padded rows never enter the arithmetic."""
        if mask is not None:
            x, g = x[mask], g[mask]
        x = x.reshape(-1, x.shape[-1]).float()
        g = g.reshape(-1, g.shape[-1]).float()
        if x.shape[0] == 0:
            return
        projected = x @ self.a(name).to(x.device).T  # (tokens, k); A drawn anew, never kept
        total = self.sums[name]
        total += (g.T @ projected).to(total.device)

    def all_reduce(self, dist: Dist) -> None:
        """Sum the accumulators over processes (before :meth:`mean`)."""
        for total in self.sums.values():
            dist.all_reduce_(total)

    def mean(self, num_examples: int) -> dict[str, torch.Tensor]:
        """``G A^T`` of the mean per-example loss: the sums divided by the number of examples."""
        return {name: total / max(num_examples, 1) for name, total in self.sums.items()}


def gradient_factors(
    sketches: dict[str, torch.Tensor],
    a_full: dict[str, torch.Tensor],
    ranks: dict[str, int],
    scalings: dict[str, float],
    step: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA factors ``(A, B)`` per matrix whose product starts as a normalised gradient step.

    For each matrix with rank ``r > 0``: ``A`` is the first ``r`` rows of its draw and
    ``P = B_ls A`` the least-squares projection of ``G`` onto ``A``'s row space
    (:func:`least_squares_b`). The initial update ``scaling * B A = -step * P / rms`` moves every
    matrix against its projected gradient; ``rms`` is the root mean square of the entries of all
    ``P`` together, so the matrices keep their relative gradient sizes and the whole update has
    entries of typical size ``step`` (one Adam-like step of learning rate ``step``). ``W`` is not
    changed (GoRA's choice): the adapter is a plain LoRA adapter that loads on the original model.
    """
    kept = {name: r for name, r in ranks.items() if r > 0}
    b_ls = {name: least_squares_b(sketches[name][:, :r], a_full[name][:r]) for name, r in kept.items()}
    # ||B A||_F^2 = trace(B (A A^T) B^T), without forming the d_out x d_in product.
    energy, count = 0.0, 0
    for name, r in kept.items():
        a = a_full[name][:r].double()
        b = b_ls[name].double()
        energy += float(((b @ (a @ a.T)) * b).sum())
        count += b.shape[0] * a.shape[1]
    rms = math.sqrt(energy / count) if count else 0.0
    factor = step / rms if rms > 0 else 0.0
    return {
        name: (a_full[name][:r].clone(), b_ls[name] * (-factor / scalings[name])) for name, r in kept.items()
    }
