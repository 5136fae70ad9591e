"""Wall-clock timing shared by allocation, layer / data selection, training and the probes.

Timers live here (not in the pipeline), so that whatever times a forward pass or waits for the
device imports this small module only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .losses import input_device, model_inputs, move_batch


def time_forward(model, batches: Sequence[dict], device=None, *, progress: bool = False) -> float:
    """Seconds for one plain forward pass over ``batches`` (the reference cost of allocation),
    as inference runs it: eval mode, no autograd graph; ``progress`` shows a tqdm bar."""
    from tqdm.auto import tqdm

    device = device or input_device(model)
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        bar = tqdm(batches, desc="reference forward pass", unit="batch", disable=not progress, leave=False)
        with torch.no_grad():
            for b in bar:
                model(**model_inputs(move_batch(b, device)))
        sync_device(device)
        return time.perf_counter() - start
    finally:
        model.train(was_training)


def sync_device(device) -> None:
    """Wait for queued CUDA work so wall-clock timings are honest (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
