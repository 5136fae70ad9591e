"""Checkpoints of a training run: ``checkpoints/step-N/`` in the run folder.

A checkpoint holds the trainable parameters (``trainable.safetensors``), the optimizer and the
scheduler state, the run's progress (:class:`TrainState`: step, epoch, batch, ...), the Python /
NumPy / torch RNG states of every process (``rng.pt``, ``rng-rank<N>.pt``), and
``method.state_dict()`` (``method.pt``) when the method has run state of its own. It is written
atomically every ``save_every`` steps and at each epoch end; ``state.json`` is written last and
marks it complete. Only the last :data:`KEEP_CHECKPOINTS` are kept. Resuming from one restores all
of it, so that on the CPU a resumed run ends with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.cache import atomic_dir
from ..core.distributed import SINGLE, Dist
from ..core.errors import SensloraError, loading
from .methods.base import Method

CHECKPOINTS_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2


@dataclass
class TrainState:
    """Progress of a run, saved in every checkpoint (``state.json``)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch done
    loss_sum: float = 0.0  # summed task loss of the current epoch's batches
    history: list[dict] = field(default_factory=list)  # one entry per completed epoch
    step_times: list[float] = field(default_factory=list)  # seconds per step, warm-up steps left out
    train_time_s: float = 0.0  # seconds of all steps
    eval_time_s: float = 0.0  # seconds of validation evaluations
    peak_memory_mb: float = 0.0  # peak growth during training, MiB (see :mod:`.memory`)
    peak_memory_total_mb: float = 0.0  # absolute peak during training, MiB
    resumed_at: list[int] = field(default_factory=list)  # steps at which the run was resumed


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    folder = Path(out) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _rng_file(rank: int) -> str:
    """The RNG state file of process ``rank`` in a checkpoint (``rng.pt`` for the main process)."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def save_checkpoint(
    out: Path, state: TrainState, model, optimizer, scheduler, method: Method, dist: Dist = SINGLE
) -> None:
    """Write a checkpoint of ``model`` (unwrapped). With several processes: the main process writes
    it, with every process's RNG state, and the others wait at a barrier."""
    from safetensors.torch import save_file

    rng_states = dist.gather(_rng_state())
    if dist.is_main:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        with atomic_dir(out / CHECKPOINTS_DIR / f"step-{state.step}") as tmp:
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for rank, rng in enumerate(rng_states):
                torch.save(rng, tmp / _rng_file(rank))
            method_state = method.state_dict()
            if method_state is not None:
                torch.save(method_state, tmp / "method.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state)))  # last: marks the checkpoint complete
        for old in checkpoints(out)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(folder: Path, model, optimizer, scheduler, method: Method, rank: int = 0) -> TrainState:
    """Restore a checkpoint into ``model`` (unwrapped), the optimizer, scheduler, method and this
    process's RNGs; returns the run's progress. A damaged checkpoint is a one-line user error."""
    fix = f"delete {folder} to resume from the checkpoint before it, or rerun with --overwrite"
    with loading("the checkpoint", folder, fix):
        return _read_checkpoint(folder, model, optimizer, scheduler, method, rank)


def _read_checkpoint(folder: Path, model, optimizer, scheduler, method: Method, rank: int) -> TrainState:
    from safetensors.torch import load_file

    saved = load_file(str(folder / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params) or any(saved[n].shape != params[n].shape for n in saved):
        raise SensloraError(
            f"checkpoint {folder} does not match the model this config builds; rerun with --overwrite"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    # Our own files; the NumPy RNG state and method states need full unpickling.
    if (folder / "method.pt").is_file():
        method.load_state_dict(torch.load(folder / "method.pt", weights_only=False))
    # This process's RNG state (a run resumed with more processes than it had: the main's).
    rng_path = folder / _rng_file(rank)
    _set_rng_state(torch.load(rng_path if rng_path.is_file() else folder / "rng.pt", weights_only=False))
    return TrainState(**json.loads((folder / "state.json").read_text()))
