"""The run folder: what ``train(config, out_dir)`` writes, and when it may write there.

A run folder holds::

    config.json          the TrainConfig (a --resume must match it, except the device)
    splits.json          example ids of train / validation / test, and the class names
    allocation/          senslora: the allocation (reused when the run resumes)
    selection/, cka/     --data-select quality / --layers cka: the selection (reused on resume)
    checkpoints/step-N/  the last 2 checkpoints; removed after success unless keep_checkpoints
    adapter/             what the method trained (PEFT ``save_pretrained`` for the LoRA family)
    result.json          written last, atomically: a run is complete exactly when it exists

A new run needs a folder that does not exist or is empty; ``overwrite`` replaces whatever it holds
(once the inputs are checked); ``resume`` continues an unfinished run whose ``config.json`` equals
the config (except :data:`RESUME_FREE_FIELDS`) and whose data gives the same ``splits.json``. A
folder holding a completed run is never resumed. An error before the first checkpoint removes the
folder the call created.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.cache import atomic_write_text
from ..core.distributed import Dist
from ..core.errors import SensloraError, loading
from .checkpoint import CHECKPOINTS_DIR, checkpoints
from .config import TrainConfig

CONFIG_NAME = "config.json"
SPLITS_NAME = "splits.json"
RESULT_NAME = "result.json"
ADAPTER_DIR = "adapter"
SELECTION_DIR = "selection"
CKA_DIR = "cka"
# Config fields a resumed run may change.
RESUME_FREE_FIELDS = ("device",)


def check_out_dir(out: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds something else than what this call may continue or replace."""
    if resume and overwrite:
        raise SensloraError("pass either --resume or --overwrite, not both")
    if resume and not out.exists():
        raise SensloraError(f"--resume: {out} does not exist; drop --resume to start a new run there")
    if not out.exists() or overwrite:
        return
    if not out.is_dir():
        raise SensloraError(f"{out} exists and is not a folder; choose another --out")
    if (out / RESULT_NAME).exists():
        raise SensloraError(
            f"{out} holds a completed run; pass --overwrite to replace it or choose another --out"
        )
    if not any(out.iterdir()):
        return
    if not resume:
        raise SensloraError(
            f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to start over"
        )
    differ = resume_differences(out, config)
    if differ:
        raise SensloraError(
            f"--resume needs the settings of the interrupted run ({out / CONFIG_NAME}); "
            f"these differ: {', '.join(differ)}"
        )


def resume_differences(out: Path, config: TrainConfig) -> list[str]:
    """The config fields (other than RESUME_FREE_FIELDS) in which the unfinished run in ``out``
    differs from ``config``; fields added since the run started take their defaults."""
    saved_path = out / CONFIG_NAME
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        raise SensloraError(
            f"{out} is not a senslora run folder (no readable {CONFIG_NAME}); choose another --out"
        ) from None
    saved = TrainConfig.from_dict(saved).to_dict() if isinstance(saved, dict) else {}
    current = config.to_dict()
    return sorted(
        k for k in set(saved) | set(current) if k not in RESUME_FREE_FIELDS and saved.get(k) != current.get(k)
    )


@contextlib.contextmanager
def run_folder(out: Path, *, overwrite: bool, dist: Dist) -> Iterator[None]:
    """Create the (checked) run folder, emptied first with ``overwrite``; if the body fails before
    the first checkpoint, remove the folder when this call created or emptied it."""
    fresh = overwrite or not out.exists() or not any(out.iterdir())
    dist.barrier()  # every process has checked the folder before the main one touches it
    if dist.is_main:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    try:
        yield
    except BaseException:
        if fresh and dist.is_main and not checkpoints(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def write_run_files(out: Path, config: TrainConfig, splits: dict, *, resume: bool, dist: Dist) -> None:
    """``config.json`` and ``splits.json`` (main process); a resumed run's data must give the same splits."""
    if resume and (out / SPLITS_NAME).is_file() and read_json(out / SPLITS_NAME, "the splits") != splits:
        raise SensloraError(f"the data differs from {out / SPLITS_NAME}; it changed since the run started")
    if dist.is_main:
        atomic_write_text(out / CONFIG_NAME, to_json(config.to_dict()))
        atomic_write_text(out / SPLITS_NAME, to_json(splits))


def write_result(out: Path, result: dict[str, Any], *, keep_checkpoints: bool) -> dict[str, Any]:
    """Write ``result.json`` (completing the run) and remove the checkpoints unless kept; returns
    the result as read back from JSON."""
    atomic_write_text(out / RESULT_NAME, to_json(result))
    if not keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    return json.loads(to_json(result))


def read_result(run_dir: str | Path) -> dict[str, Any]:
    """The ``result.json`` of a completed run folder."""
    path = Path(run_dir) / RESULT_NAME
    if not path.is_file():
        raise SensloraError(
            f"{run_dir} is not a completed run folder (no {RESULT_NAME}); run `senslora train` (or --resume it)"
        )
    with loading("the run result", path, f"rerun `senslora train` for {run_dir}"):
        result = json.loads(path.read_text())
    if not isinstance(result, dict):
        raise SensloraError(
            f"{path} is not a run result (a JSON object); rerun `senslora train` for {run_dir}"
        )
    return result


def check_split(run: Path, split: str, examples: list, task_name: str) -> None:
    """The ``split`` examples must be those ``splits.json`` recorded when the run trained."""
    try:
        saved = json.loads((run / SPLITS_NAME).read_text())[split]
    except (OSError, ValueError, KeyError) as exc:
        raise SensloraError(f"cannot read {run / SPLITS_NAME} ({exc})") from None
    if [ex.id for ex in examples] != saved:
        raise SensloraError(
            f"the {split} split of {task_name} differs from {run / SPLITS_NAME}; the data changed since training"
        )


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a run folder that --resume reuses, with a one-line error when it is damaged."""
    with loading(what, path, "the run folder is damaged: rerun with --overwrite"):
        return json.loads(path.read_text())


def to_json(data: Any) -> str:
    """The run folder's JSON text: indented, anything else as ``str``, a final newline."""
    return json.dumps(data, indent=2, default=str) + "\n"
