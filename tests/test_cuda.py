"""Device placement on a CUDA device: what a CPU machine cannot tell apart from the CPU path.
Marked ``cuda`` (skipped without a device); scripts/gpu-check.sh runs them."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama, token_batches

from senslora.core.losses import input_device
from senslora.core.pipeline import allocate
from senslora.data.models import load_model

pytestmark = pytest.mark.cuda


def _ranks(model, accumulate_on: str, device=None) -> dict[str, int]:
    batches = token_batches()
    return allocate(
        model, batches, avg_rank=2, accumulate_on=accumulate_on, device=device, progress=False
    ).ranks


@pytest.mark.parametrize("accumulate_on", ["cpu", "device"])
def test_allocation_on_cuda_equals_the_cpu_run(accumulate_on):
    reference = _ranks(tiny_llama().double(), "cpu")
    model = tiny_llama().double().to("cuda")
    assert input_device(model).type == "cuda"
    before = torch.cuda.memory_allocated()
    assert _ranks(model, accumulate_on) == reference
    assert next(model.parameters()).device.type == "cuda"  # the model is left where it was
    assert torch.cuda.memory_allocated() - before < 1 << 20  # no accumulators left behind


def test_load_model_on_cuda_in_bfloat16(tmp_path, word_tokenizer):
    tiny_llama().save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, device="cuda", dtype="bfloat16")
    param = next(model.parameters())
    assert param.device.type == "cuda" and param.dtype == torch.bfloat16
