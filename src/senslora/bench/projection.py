"""What allocation would cost for an 8B model on one GPU, projected from measured probes.

Issue 6 asks for this on paper (memory and time), compared with the paper's 25.78 s for
LLaMA3.1-8B (PIQA as the calibration set, the Sensitivity-LoRA paper, section 5). Everything here is either
*measured* (from ``allocation-probe`` results of a benchmark run) or *exact* (counted on the
model's architecture, built on the meta device: no weights, no download); the one *assumption*,
the GPU's sustained throughput, is a named parameter printed next to the result.

* Linearity: allocation seconds against calibration tokens, least-squares line and R² over the
  ``alloc-scaling`` probes of one model (the cost must grow linearly in tokens).
* Overhead: allocation / one plain forward pass, the median over those probes (measured).
* Time for the big model: ``overhead x 2 N T / (peak_flops x utilisation)``: a forward pass costs
  about ``2 N`` FLOPs per token for ``N`` parameters (Kaplan et al., 2020; here ``N`` counts every
  parameter, embedding included, an upper bound: an embedding lookup costs no matrix product).
* Memory for the big model: the weights in bf16, plus the estimator's fp32 accumulators: one
  ``d_in`` vector per target matrix for ``activation`` (our compact form), one full diagonal per
  matrix (``d_out x d_in``) for ``fisher`` / ``hutchinson``, which also need the gradients
  (bf16, one per weight) of the backward pass.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# LLaMA-3.1-8B's published architecture (config.json of meta-llama/Llama-3.1-8B), typed here
# because the hub is unreachable; only the shapes matter.
LLAMA31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}
PAPER_SECONDS_8B = 25.78  # the Sensitivity-LoRA paper, section 5: LLaMA3.1-8B, PIQA calibration, metrics + allocation
A100_BF16_FLOPS = 312e12  # dense bf16 peak of an A100 (NVIDIA data sheet)
DEFAULT_UTILISATION = 0.4  # ASSUMED sustained fraction of peak for a batched forward pass


@dataclass(frozen=True)
class Architecture:
    """Counts of one model's target matrices (exact, from its modules)."""

    name: str
    params: int  # all parameters
    matrix_params: int  # parameters in target matrices (sum of d_out * d_in)
    sum_d_in: int  # sum of d_in over target matrices
    matrices: int


def architecture(model, name: str) -> Architecture:
    """Count ``model``'s target matrices (works on a meta-device model)."""
    from ..core.targets import find_targets

    targets = find_targets(model)
    return Architecture(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        matrix_params=sum(t.shape[0] * t.shape[1] for t in targets),
        sum_d_in=sum(t.shape[1] for t in targets),
        matrices=len(targets),
    )


def llama31_8b() -> Architecture:
    """LLaMA-3.1-8B's architecture, built on the meta device (no memory, no download)."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**LLAMA31_8B))
    return architecture(model, "LLaMA-3.1-8B")


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: returns ``(a, b, r2)`` (scipy.stats.linregress)."""
    from scipy import stats

    fit = stats.linregress(x, y)
    return float(fit.intercept), float(fit.slope), float(fit.rvalue**2)


def memory_gib(arch: Architecture, estimator: str, weight_bytes: int = 2) -> dict[str, float]:
    """Weights (``weight_bytes`` each) and the estimator's fp32 accumulators (and gradients), GiB."""
    gib = 1024**3
    weights = arch.params * weight_bytes / gib
    if estimator == "activation":
        accumulators, gradients = arch.sum_d_in * 4 / gib, 0.0
    else:  # fisher / hutchinson: one fp32 diagonal per matrix, and a backward pass
        accumulators, gradients = arch.matrix_params * 4 / gib, arch.params * weight_bytes / gib
    return {
        "weights": weights,
        "accumulators": accumulators,
        "gradients": gradients,
        "total": weights + accumulators + gradients,
    }


def projected_seconds(
    arch: Architecture,
    tokens: int,
    overhead: float,
    *,
    peak_flops: float = A100_BF16_FLOPS,
    utilisation: float = DEFAULT_UTILISATION,
) -> float:
    """``overhead x`` one forward pass of ``tokens`` tokens at ``2 N`` FLOPs per token."""
    return overhead * 2 * arch.params * tokens / (peak_flops * utilisation)


def projection_lines(probes: Sequence[dict], *, model: str = "smollm2") -> list[str]:
    """The report's projection section from ``alloc-scaling``-style probes of ``model``."""
    from .profiling import paired_ratio

    rows = [
        r for r in probes if r.get("model") == model and r.get("estimator") == "activation" and r.get("runs")
    ]
    if len({r["tokens"] for r in rows}) < 3:
        return []
    rows.sort(key=lambda r: r["tokens"])
    tokens = [r["tokens"] for r in rows]
    seconds = [r["allocation_s"] for r in rows]
    a, b, r2 = linear_fit(tokens, seconds)
    overhead = statistics.median(paired_ratio(r["runs"]) for r in rows)
    # Achieved CPU throughput on the measured model (2 N FLOPs per token of a forward pass).
    dtype = (rows[0].get("params") or {}).get("dtype", "float32")  # the probe's default is float32
    measured_params = rows[0]["model_bytes"] / (2 if dtype in ("bfloat16", "float16") else 4)
    cpu_flops = statistics.median(2 * measured_params * r["tokens"] / r["forward_s"] for r in rows)
    big = llama31_8b()
    lines = [
        "## Projection: allocation for an 8B model on one GPU",
        "",
        f"From the activation-estimator probes of `{model}` above ({len(rows)} calibration sizes, "
        f"{tokens[0]}–{tokens[-1]} tokens) and {big.name}'s architecture (built on the meta device: "
        f"{big.params / 1e9:.2f}B parameters, {big.matrices} target matrices). "
        "Measured: the first two bullets; exact: the memory; assumed: the GPU throughput.",
        "",
        f"- Cost against calibration tokens: allocation s = {a:.3f} + {b * 1e3:.3f} ms × tokens, "
        f"R² = {r2:.4f} (linear in the calibration set).",
        f"- Allocation / one forward pass (median over those probes): {overhead:.2f}.",
        f"- This CPU's forward pass ran at {cpu_flops / 1e9:.0f} GFLOP/s (2 N FLOPs per token); an "
        f"A100 in bf16 has a {A100_BF16_FLOPS / 1e12:.0f} TFLOP/s peak, of which we assume "
        f"{DEFAULT_UTILISATION:.0%} is sustained.",
        "",
        "| calibration set | tokens | projected allocation on one A100 (s) | paper (s) |",
        "|---|---|---|---|",
    ]
    for label, n_tokens in [
        ("128 sequences × 512 tokens", 128 * 512),
        ("PIQA validation, ≈1,838 items × ≈40 tokens", 1838 * 40),
        ("1,024 sequences × 2,048 tokens", 1024 * 2048),
    ]:
        seconds_8b = projected_seconds(big, n_tokens, overhead)
        paper = f"{PAPER_SECONDS_8B:g} (PIQA)" if label.startswith("PIQA") else "–"
        lines.append(f"| {label} | {n_tokens:,} | {seconds_8b:.1f} | {paper} |")
    lines += [
        "",
        "| estimator | weights bf16 (GiB) | fp32 accumulators (GiB) | gradients bf16 (GiB) | total (GiB) |",
        "|---|---|---|---|---|",
    ]
    for estimator in ("activation", "fisher"):
        m = memory_gib(big, estimator)
        lines.append(
            f"| {estimator}{' / hutchinson' if estimator == 'fisher' else ''} | {m['weights']:.2f} | "
            f"{m['accumulators']:.3g} | {m['gradients']:.2f} | {m['total']:.2f} |"
        )
    lines += [
        "",
        "Activations of one calibration batch come on top (transient, one block at a time). With "
        "`--device-map auto --offload-folder DIR` the weights need not fit on the GPU at all: "
        "accelerate brings each block in for its forward pass (activation estimator only).",
        "",
    ]
    return lines
