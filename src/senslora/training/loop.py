"""The training loop of a run: :func:`build_loop` sets it up, :meth:`Loop.run` runs it.

The loop (an ``accelerate`` Accelerator, AdamW over the trainable parameters, linear warm-up and
decay) runs, for every batch: ``method.on_step_begin`` -> forward -> task loss (the mean of
:func:`senslora.core.losses.per_example_loss`, plus ``method.extra_loss(model)``, e.g. AdaLoRA's
orthogonality penalty) -> backward -> gradient clipping -> ``optimizer.step`` ->
``method.on_optimizer_step`` -> ``scheduler.step`` -> ``zero_grad``. The data order of epoch ``e``
is a permutation drawn from a ``torch.Generator`` seeded with ``(seed, e)``, so a resumed run skips
exactly the batches already seen. A checkpoint (:mod:`.checkpoint`) is written every
``save_every`` steps and at each epoch end, after the epoch's validation when ``eval_each_epoch``.

Measured: per-step time (forward to ``zero_grad``; each process's first step is warm-up and left
out of the mean and median), total step time, evaluation time, and peak memory (:mod:`.memory`).

Several processes (``accelerate launch --num_processes N -m senslora train ...``, or ``torchrun``):
every process builds the same epoch order and batches; each batch of ``batch_size`` examples is
split over the processes (rows ``rank::N``), so a step still sees ``batch_size`` examples and the
run has the same number of steps and learning-rate schedule as with one process. The model is
wrapped in DDP (``accelerator.prepare``); each process back-propagates ``N / batch_size`` times the
sum of its examples' losses, so DDP's gradient average is the gradient of the batch mean loss. Method
hooks (AdaLoRA's ``update_and_allocate``, DyLoRA's rank draw, extra losses) see the unwrapped model
and behave identically on every process (same seeds, synchronised gradients). Only the main
process runs the per-epoch validation and writes checkpoints (with every process's RNG state); the
others wait at the checkpoint's barrier. Per-step time and peak memory are each process's own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.distributed import SINGLE, Dist
from ..core.errors import SensloraError
from ..core.timing import sync_device
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .memory import PeakMemory
from .methods.base import Method


def make_accelerator(device):
    """The run's Accelerator. Batches are split over processes (``split_batches``): a step is one
    batch of ``batch_size`` examples whatever the number of processes, and the prepared scheduler
    steps once per optimizer step."""
    from accelerate import Accelerator, DataLoaderConfiguration

    from ..data.models import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return Accelerator(cpu=dev.type == "cpu", dataloader_config=DataLoaderConfiguration(split_batches=True))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the ``n`` train examples in ``epoch``: a permutation seeded by ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=generator).tolist()


def epoch_batches(
    examples: Sequence, tokenizer, *, kind: str, config: TrainConfig
) -> Callable[[int], list[dict]]:
    """``epoch -> batches``: ``examples`` in :func:`epoch_order`, tokenised into ``batch_size`` batches."""
    from ..data.examples import make_batches

    def batches(epoch: int) -> list[dict]:
        order = epoch_order(len(examples), config.seed, epoch)
        return make_batches(
            [examples[i] for i in order],
            tokenizer,
            kind=kind,
            max_length=config.max_length,
            batch_size=config.batch_size,
        )

    return batches


def training_loss(
    model,
    batch: dict,
    method: Method,
    *,
    unwrapped=None,
    dist: Dist = SINGLE,
    global_size: int = 0,
    weight: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """(loss to back-propagate, task loss of the whole batch as a float).

    With several processes ``batch`` is this process's rows of a batch of ``global_size`` examples
    (``weight`` 0 for a stand-in row when it got none): the loss is ``world_size / global_size``
    times the sum of its per-example losses, so DDP's gradient average is the gradient of the whole
    batch's mean loss; the reported task loss is summed over the processes. Method extras see
    ``unwrapped`` (the model without its DDP wrapper).
    """
    from ..core.losses import per_example_loss

    losses = per_example_loss(model, batch)
    if dist.enabled:
        local = losses.sum() * weight
        loss = local * (dist.world_size / global_size)
        total = dist.all_reduce_(local.detach().double().reshape(1))
        value = float(total.item()) / global_size
    else:
        loss = losses.mean()
        value = float(loss.detach())
    penalty = method.extra_loss(unwrapped if unwrapped is not None else model)
    if penalty is not None:
        loss = loss + penalty
    return loss, value


def local_rows(batch: dict, dist: Dist) -> tuple[dict, int, float]:
    """(this process's rows ``rank::world_size`` of ``batch``, the batch's size, weight).

    A process left without rows (a batch smaller than the number of processes) gets the first row
    with weight 0, so that it still takes part in DDP's gradient reduction.
    """
    size = int(batch["input_ids"].shape[0])
    rows = slice(dist.rank, None, dist.world_size) if dist.rank < size else slice(0, 1)
    local = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return local, size, 1.0 if dist.rank < size else 0.0


@dataclass
class Loop:
    """One run's training loop: what it steps, and what it does around the steps."""

    model: nn.Module  # as the accelerator prepared it (DDP-wrapped with several processes)
    unwrapped: nn.Module  # the same parameters unwrapped: method hooks, validation, checkpoints
    method: Method
    optimizer: Any
    scheduler: Any
    accelerator: Any
    trainable: list[torch.nn.Parameter]
    config: TrainConfig  # epochs, max_grad_norm, save_every
    total_steps: int
    dist: Dist = SINGLE
    out: Path | None = None  # the run folder the checkpoints go to (None: no checkpoints)
    validate: Callable[[nn.Module], dict] | None = None  # per-epoch validation metrics (main process)
    step_callback: Callable[[int], None] | None = None  # called with the step number after each step
    progress: bool = False
    description: str = ""  # of the progress bar

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def resume(self, folder: Path) -> TrainState:
        """Restore the checkpoint ``folder``; returns the progress to continue from."""
        state = load_checkpoint(
            folder, self.unwrapped, self.optimizer, self.scheduler, self.method, self.dist.rank
        )
        state.resumed_at.append(state.step)
        return state

    def run(self, state: TrainState, batches: Callable[[int], list[dict]]) -> PeakMemory:
        """Train from ``state`` (updated in place) to the end of the last epoch; ``batches(e)`` are
        the batches of epoch ``e``. Returns the peak memory measurement."""
        from tqdm.auto import tqdm

        memory = PeakMemory(self.device)
        bar = tqdm(
            total=self.total_steps, initial=state.step, desc=self.description, disable=not self.progress
        )
        warm = True  # the first step of every process is warm-up
        self.model.train()
        for epoch in range(state.epoch, self.config.epochs):
            this_epoch = batches(epoch)
            for index in range(state.batch, len(this_epoch)):
                seconds, task_loss = self.step(this_epoch[index], state.step)
                state.train_time_s += seconds
                if warm:
                    memory.after_warmup()
                else:
                    state.step_times.append(seconds)
                warm = False
                state.step += 1
                state.batch = index + 1
                state.loss_sum += task_loss
                bar.update(1)
                bar.set_postfix(loss=f"{task_loss:.4f}")
                if self.config.save_every and state.step % self.config.save_every == 0:
                    if state.batch < len(this_epoch):  # the epoch end writes its own
                        memory.record(state)
                        self._checkpoint(state)
                if self.step_callback is not None:
                    self.step_callback(state.step)
            memory.record(state)
            entry = self._end_epoch(epoch, state)
            if self.progress:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in entry.get("validation", {}).items())
                bar.write(
                    f"epoch {epoch + 1}: train_loss={entry['train_loss']:.4f}"
                    + (f", validation {shown}" if shown else "")
                )
            self._checkpoint(state)
        bar.close()
        return memory

    def step(self, batch: dict, step: int) -> tuple[float, float]:
        """Optimizer step ``step`` on ``batch`` (with several processes, on this process's rows):
        (seconds from the forward pass to ``zero_grad``, the batch's task loss)."""
        from ..core.losses import move_batch

        global_size, weight = 0, 1.0
        if self.dist.enabled:
            batch, global_size, weight = local_rows(batch, self.dist)
        batch = move_batch(batch, self.device)
        start = time.perf_counter()
        self.method.on_step_begin(self.unwrapped, step)
        loss, task_loss = training_loss(
            self.model,
            batch,
            self.method,
            unwrapped=self.unwrapped,
            dist=self.dist,
            global_size=global_size,
            weight=weight,
        )
        self.accelerator.backward(loss)
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.method.on_optimizer_step(self.unwrapped, step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync_device(self.device)
        return time.perf_counter() - start, task_loss

    def _end_epoch(self, epoch: int, state: TrainState) -> dict[str, Any]:
        """Close epoch ``epoch`` in ``state``: its history entry (train loss, validation metrics)."""
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": state.loss_sum / max(1, state.batch),
        }
        if self.validate is not None and self.dist.is_main:
            # The main process evaluates; the others wait in the checkpoint's barrier.
            start = time.perf_counter()
            entry["validation"] = self.validate(self.unwrapped)
            state.eval_time_s += time.perf_counter() - start
        self.model.train()
        state.history.append(entry)
        state.epoch, state.batch, state.loss_sum = epoch + 1, 0, 0.0
        return entry

    def _checkpoint(self, state: TrainState) -> None:
        if self.out is not None:
            save_checkpoint(
                self.out, state, self.unwrapped, self.optimizer, self.scheduler, self.method, self.dist
            )


def build_loop(
    model: nn.Module,
    method: Method,
    config: TrainConfig,
    total_steps: int,
    accelerator,
    *,
    dist: Dist = SINGLE,
    **hooks: Any,
) -> Loop:
    """The loop over ``model`` (prepared by ``method``, on the accelerator's device): AdamW over its
    trainable parameters with ``config.lr`` and ``weight_decay``, the linear schedule with
    ``warmup_ratio`` warm-up over ``total_steps``, all prepared by ``accelerator``. ``hooks`` are
    the remaining :class:`Loop` fields (``out``, ``validate``, ``step_callback``, ``progress``, ...)."""
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SensloraError(f"method {config.method} left no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    warmup = math.ceil(config.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    # With several processes the model comes back wrapped in DDP; hooks, evaluation and saving
    # use the unwrapped model (the same parameters).
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return Loop(
        model=model,
        unwrapped=accelerator.unwrap_model(model),
        method=method,
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        trainable=trainable,
        config=config,
        total_steps=total_steps,
        dist=dist,
        **hooks,
    )
