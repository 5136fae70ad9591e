"""Cost probes for the benchmark: allocation time and memory relative to a forward pass.

The benchmark harness runs each probe in its own process (``senslora bench``, one process per
run), so that peak memory is the probe's own: on the CPU, peak resident memory (``ru_maxrss``)
minus the resident memory right after the model and data were loaded; on CUDA, ``torch.cuda.max_memory_allocated``
minus the allocated memory before estimation. The same is reported for plain forward passes
over the same batches (measured first, since peaks only grow), so the estimator's own extra
memory is the difference.
"""

from __future__ import annotations

import statistics

import torch

from ..core.memory import peak_rss_bytes, rss_bytes


def time_forward_backward(model, batches) -> float | None:
    """Seconds for one forward + backward of the task loss over ``batches`` (all weights get grads).

    The reference cost for the gradient-based estimators; ``None`` when the batches have no labels.
    """
    import time

    from ..core.losses import move_batch, per_example_loss

    if not all("labels" in b for b in batches):
        return None
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        for b in batches:
            per_example_loss(model, move_batch(b, dev)).sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def allocation_probe(
    *,
    model: str = "minilm",
    calib: str = "movie",
    estimator: str = "activation",
    preset: str | None = None,
    calib_samples: int = 128,
    max_length: int = 128,
    batch_size: int = 8,
    avg_rank: float = 4,
    repeats: int = 3,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    num_probes: int = 1,
    init: str = "zero",
    peers: tuple[str, ...] | list[str] = (),
) -> dict:
    """Time allocation against one plain forward pass over the same batches, in this process.

    ``init``: the adapter initialisation whose calibration work is part of the allocation
    (``gradient``: its sketch pass; the memory of its sketch is reported against the adapter's).
    ``peers``: PEFT initialisations (``eva``, ``lora-ga``, ...) timed on a copy of the model, with
    uniform LoRA of rank ``avg_rank`` on the same targets and the same calibration batches.

    ``repeats`` alternating (forward, allocation) measurements. ``ratio_to_forward`` is the median
    over repeats of allocation / the forward pass measured just before it (a pair run back to back
    sees the same load on the machine); ``forward_s`` and ``allocation_s`` are the minima (the
    least disturbed), and ``ratio_of_minima`` their ratio.
    """
    from ..core.estimators import estimator_class
    from ..core.inits import NEEDS_LABELS
    from ..core.pipeline import allocate
    from ..data.examples import calibration_batches
    from ..data.models import load_model, model_kind
    from ..training.train import seed_everything

    needs = estimator_class(estimator)
    seed_everything(seed)
    net, tok = load_model(
        model, device=device, dtype=dtype, attn_implementation="eager" if needs.eager_attention else None
    )
    kind = model_kind(net)
    batches = calibration_batches(
        calib,
        tok,
        kind,
        samples=calib_samples,
        seed=seed,
        max_length=max_length,
        batch_size=batch_size,
        estimator=estimator,
        # the labels of whichever init (ours or a peer's) needs the task loss
        init=next((i for i in (init, *peers) if i in NEEDS_LABELS), init),
    )
    dev = next(net.parameters()).device
    model_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    from ..core.timing import time_forward

    # Memory: peak after plain forward passes first (peaks only grow), then after allocation.
    rss_before = rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        cuda_before = torch.cuda.memory_allocated(dev)
    time_forward(net, batches)
    forward_peak = (
        torch.cuda.max_memory_allocated(dev) - cuda_before
        if dev.type == "cuda"
        else peak_rss_bytes() - rss_before
    )
    runs = []
    for i in range(repeats):
        alloc = allocate(
            net,
            batches,
            avg_rank=avg_rank,
            preset=preset,
            estimator=estimator,
            seed=seed,
            num_probes=num_probes,
            progress=False,
            measure_forward=True,
            init=init,
        )
        runs.append(dict(alloc.timings))
        if i == 0:
            ranks = alloc.ranks
    if dev.type == "cuda":
        extra = torch.cuda.max_memory_allocated(dev) - cuda_before
    else:
        extra = max(0, peak_rss_bytes() - rss_before)
    # Forward + backward reference for the gradient-based estimators, after the memory reading
    # (full-model gradients would otherwise count as the estimator's memory).
    fb = (
        [time_forward_backward(net, batches) for _ in range(repeats)]
        if needs.needs_grad or init in NEEDS_LABELS
        else []
    )
    peer_seconds = {peer: _time_peer_init(net, batches, peer, avg_rank, list(ranks), seed) for peer in peers}
    sketch = alloc.sketch
    fwd = min(r["forward"] for r in runs)
    total = min(r["total"] for r in runs)
    tokens = alloc.calibration["tokens"]
    return {
        "model": model,
        "estimator": estimator,
        "recipe": alloc.recipe,
        "concentration": alloc.concentration,
        "calib": calib,
        "calib_samples": calib_samples,
        "examples": alloc.calibration["examples"],
        "tokens": tokens,
        "matrices": len(ranks),
        "repeats": repeats,
        "forward_s": fwd,
        "allocation_s": total,
        "ratio_to_forward": paired_ratio(runs),
        "ratio_of_minima": total / fwd,
        "forward_backward_s": min(fb) if fb and fb[0] is not None else None,
        "ratio_to_forward_backward": total / min(fb) if fb and fb[0] is not None else None,
        "seconds_per_example": total / alloc.calibration["examples"],
        "forward_seconds_per_example": fwd / alloc.calibration["examples"],
        "seconds_per_token": total / tokens,
        "model_bytes": model_bytes,
        "extra_peak_bytes": int(extra),
        "extra_peak_over_model": extra / model_bytes,
        "forward_extra_peak_bytes": int(max(0, forward_peak)),
        "forward_extra_peak_over_model": max(0, forward_peak) / model_bytes,
        "memory_measure": "cuda max_memory_allocated"
        if dev.type == "cuda"
        else "peak RSS growth (ru_maxrss)",
        "device": str(dev),
        "runs": runs,
        "ranks": ranks,
        "init": init,
        "init_pass": alloc.init_pass,
        "init_s": min(r.get("init", 0.0) for r in runs),
        "adapter_bytes": 4 * alloc.trainable_params,
        "sketch_bytes": _sketch_bytes(sketch),
        "sketch_over_adapter": _sketch_bytes(sketch) / (4 * alloc.trainable_params),
        "peer_init_s": peer_seconds,
        "allocation_over_peer_init": {p: total / t for p, t in peer_seconds.items() if t},
    }


def _sketch_bytes(sketch) -> int:
    """Bytes the gradient init's sketch held: its accumulators (its random A is drawn anew in each
    hook, never kept; 0 without a sketch)."""
    if sketch is None:
        return 0
    return int(sum(t.numel() * t.element_size() for t in sketch.sums.values()))


def _time_peer_init(net, batches, peer: str, avg_rank: float, targets: list[str], seed: int) -> float:
    """Seconds of PEFT's ``peer`` initialisation of uniform LoRA on a copy of ``net``."""
    import copy
    import time

    from peft import LoraConfig

    from ..core.inits import init_peft_model

    model = copy.deepcopy(net)
    config = LoraConfig(r=max(1, round(avg_rank)), lora_alpha=2 * avg_rank, target_modules=targets)
    start = time.perf_counter()
    init_peft_model(model, config, peer, batches=batches, seed=seed)
    return time.perf_counter() - start


def paired_ratio(runs: list[dict]) -> float:
    """Median over repeats of ``total / forward`` within each (forward, allocation) pair."""
    return statistics.median(r["total"] / r["forward"] for r in runs)
