"""Several processes (``accelerate launch`` / ``torchrun``): who runs what, and the few collectives used.

senslora never starts processes itself; a launcher does::

    accelerate launch --num_processes 2 -m senslora allocate ...
    torchrun --nproc_per_node 2 -m senslora train ...

:func:`current` tells a process its rank and the world size. When the launcher asked for several
processes (``WORLD_SIZE > 1``) and no process group exists yet, it creates one through
``accelerate.PartialState`` (gloo on the CPU, nccl on CUDA). With one process nothing here touches
``torch.distributed``: :data:`SINGLE` is returned and every helper is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (``rank`` 0 of ``world_size`` 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process: the collectives below communicate."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes outputs and shows progress."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether item ``index`` of a sharded sequence is this process's (``index % world_size == rank``)."""
        return index % self.world_size == self.rank

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's items: ``items[rank::world_size]``."""
        return list(items[self.rank :: self.world_size])

    # Collectives: every process of the group must call them, in the same order.
    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place (no copy, except a CPU tensor under nccl)."""
        if not self.enabled:
            return tensor
        if tensor.device.type == "cpu" and _backend_needs_cuda():
            # nccl reduces CUDA tensors only: one tensor at a time through this process's GPU.
            on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            torch.distributed.all_reduce(on_device)
            tensor.copy_(on_device)
            return tensor
        torch.distributed.all_reduce(tensor)
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``src``'s ``obj`` on every process (pickled; for small objects)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src, device=_object_device())
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process (pickled; for small objects)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


SINGLE = Dist()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _backend_needs_cuda() -> bool:
    return "nccl" in str(torch.distributed.get_backend()).lower()


def _object_device() -> torch.device | None:
    # Object collectives pickle into a byte tensor that must sit where the backend can send it.
    if _backend_needs_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def current(*, cpu: bool | None = None) -> Dist:
    """This process's :class:`Dist`; creates the process group when a launcher asked for one.

    Args:
        cpu: force the gloo (CPU) backend when creating the group; default: CPU when CUDA is not
            available or ``ACCELERATE_USE_CPU`` is set. Ignored when the group exists.

    Returns :data:`SINGLE` (without touching ``torch.distributed``) when ``WORLD_SIZE`` is unset or
    1 and no process group is initialised.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    if _env_int("WORLD_SIZE", 1) <= 1 or not dist.is_available():
        return SINGLE
    from accelerate import PartialState

    if cpu is None:
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        cpu = use_cpu or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes <= 1 or not dist.is_initialized():
        return SINGLE
    return Dist(state.process_index, state.num_processes, state.local_process_index)


def process_device(device: Any, dist: Dist) -> Any:
    """``device`` for this process. With several processes an index-less ``cuda`` becomes
    ``cuda:<local rank>`` (one GPU per process, as the launchers assume) and ``None`` becomes that
    GPU under nccl, the CPU under gloo; anything else, and everything with one process, is unchanged."""
    if not dist.enabled:
        return device
    if device is None:
        return torch.device("cuda", dist.local_rank) if _backend_needs_cuda() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", dist.local_rank)
    return device
