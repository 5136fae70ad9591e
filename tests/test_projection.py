"""The 8B projection: exact architecture counts, the linear fit, memory and time formulas."""

import pytest

from senslora.bench.projection import (
    A100_BF16_FLOPS,
    DEFAULT_UTILISATION,
    Architecture,
    linear_fit,
    llama31_8b,
    memory_gib,
    projected_seconds,
    projection_lines,
)


def test_llama31_8b_counts_on_the_meta_device():
    arch = llama31_8b()
    assert arch.matrices == 32 * 7
    # q, o: 4096 -> 4096; k, v: 4096 -> 1024; gate, up: 4096 -> 14336; down: 14336 -> 4096.
    assert arch.sum_d_in == 32 * (4096 * 6 + 14336)
    assert arch.matrix_params == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert 8.0e9 < arch.params < 8.1e9  # the published 8.03B


def test_linear_fit_and_formulas():
    a, b, r2 = linear_fit([100, 200, 400], [1.5, 2.5, 4.5])
    assert (a, b, r2) == (pytest.approx(0.5), pytest.approx(0.01), pytest.approx(1.0))
    arch = Architecture("x", params=1000, matrix_params=800, sum_d_in=40, matrices=4)
    act, fisher = memory_gib(arch, "activation"), memory_gib(arch, "fisher")
    assert act["accumulators"] * 1024**3 == 160 and act["gradients"] == 0
    assert fisher["accumulators"] * 1024**3 == 3200 and fisher["gradients"] * 1024**3 == 2000
    # A worked case with round numbers: 2 x 1000 parameters x 50 tokens = 1e5 FLOPs; at 1e5 FLOP/s
    # achieved (peak 2e5, half of it used) one forward pass takes 1 s, 1.1 passes 1.1 s.
    assert projected_seconds(arch, 50, 1.1, peak_flops=2e5, utilisation=0.5) == pytest.approx(1.1)
    # The defaults are an A100's bf16 peak at a utilisation below one: a real 8B forward pass of
    # 1,000 tokens (1.6e13 FLOPs) cannot take less than 50 ms there.
    assert 0 < DEFAULT_UTILISATION <= 1 and A100_BF16_FLOPS == 312e12
    assert projected_seconds(llama31_8b(), 1000, 1.0) >= 2 * 8.0e9 * 1000 / 312e12


def _probe(tokens, seconds, ratio):
    return {
        "model": "smollm2",
        "estimator": "activation",
        "tokens": tokens,
        "allocation_s": seconds,
        "forward_s": seconds / ratio,
        "model_bytes": 4 * 1000,
        "runs": [{"total": seconds, "forward": seconds / ratio}],
    }


def test_projection_section_needs_three_sizes_and_reports_the_fit():
    assert projection_lines([_probe(100, 1.0, 1.1), _probe(200, 2.0, 1.1)]) == []
    lines = projection_lines([_probe(100, 1.0, 1.0), _probe(200, 2.0, 1.2), _probe(400, 4.0, 1.1)])
    text = "\n".join(lines)
    assert "R² = 1.0000" in text and "(median over those probes): 1.10" in text
    assert "25.78 (PIQA)" in text and "| activation |" in text
