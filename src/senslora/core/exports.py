"""Config snippets that hand an allocation to other trainers: ``axolotl.yaml`` and ``llamafactory.yaml``.

Both are pure functions of an :class:`~senslora.core.pipeline.Allocation` (through its
``to_lora_config``, so they say exactly what ``lora_config/`` says) and the path of the saved
PEFT adapter (``<out>/adapter/``, written by ``senslora allocate``). They are snippets: merge them
into your own config, which names the base model, the data and the training arguments.

* axolotl (keys checked against axolotl v0.18.0, the first release with ``lora_rank_pattern`` /
  ``lora_alpha_pattern``): ``adapter: lora``, ``lora_r``, ``lora_alpha``, ``lora_dropout``,
  ``lora_target_modules`` (the full module names), ``lora_rank_pattern`` and ``lora_alpha_pattern``
  (PEFT's regexes, forwarded to ``LoraConfig.rank_pattern`` / ``alpha_pattern``), and
  ``peft_use_rslora`` for ``--alpha-mode rslora``. ``lora_model_dir`` (axolotl then loads the
  saved adapter trainable, and its ``adapter_config.json`` governs ranks and alphas) is written
  where the adapter's weights matter (an initialisation was chosen), and where an alpha is not an
  integer: axolotl's schema takes integer alphas only, so the patterns alone could not say it.
* LLaMA-Factory (checked against v0.9.5): it takes per-module ranks only from a saved adapter,
  so the snippet is ``finetuning_type: lora``, ``adapter_name_or_path`` (the last adapter listed
  is resumed trainable) and ``create_new_adapter: false``.

An allocation made on a bitsandbytes-quantised model (``Allocation.quantized``) says so in both:
axolotl's ``adapter: qlora`` with ``load_in_4bit`` (``load_in_8bit`` for 8-bit), LLaMA-Factory's
``quantization_bit``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

AXOLOTL_FILE = "axolotl.yaml"
LLAMAFACTORY_FILE = "llamafactory.yaml"
AXOLOTL_VERSION = "0.18.0"
LLAMAFACTORY_VERSION = "0.9.5"


def _integral(value: float) -> int | None:
    """``value`` as an int when it is a whole number, else None."""
    number = float(value)
    return int(number) if number.is_integer() else None


def _dump(header: list[str], body: dict[str, Any]) -> str:
    import yaml

    lines = [f"# {line}" if line else "#" for line in header]
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=False, width=1000)


def axolotl_config(alloc, adapter_dir: str | Path, *, base_config=None, weights: bool = False) -> dict[str, Any]:
    """The axolotl keys of ``alloc`` (see the module docstring); ``weights``: the adapter's weights
    matter (an initialisation was chosen), so axolotl must load them (``lora_model_dir``)."""
    config = alloc.to_lora_config(base_config)
    alphas = {key: _integral(value) for key, value in (config.alpha_pattern or {}).items()}
    alpha = _integral(config.lora_alpha)
    exact = alpha is not None and all(value is not None for value in alphas.values())
    body: dict[str, Any] = {"adapter": "qlora" if alloc.quantized == "4bit" else "lora"}
    if alloc.quantized in ("4bit", "8bit"):  # allocated on the quantised model: train on it too
        body[f"load_in_{alloc.quantized}"] = True
    if weights or not exact:
        body["lora_model_dir"] = str(adapter_dir)
    body["lora_r"] = int(config.r)
    if exact:
        body["lora_alpha"] = alpha
    body["lora_dropout"] = float(config.lora_dropout)
    targets = set(config.target_modules)  # PEFT keeps a set: list them in the allocation's order
    body["lora_target_modules"] = [name for name in alloc.ranks if name in targets]
    body["lora_rank_pattern"] = {key: int(value) for key, value in config.rank_pattern.items()}
    if exact and alphas:
        body["lora_alpha_pattern"] = alphas
    if config.use_rslora:
        body["peft_use_rslora"] = True
    return body


def axolotl_yaml(alloc, adapter_dir: str | Path, *, base_config=None, weights: bool = False) -> str:
    """``axolotl.yaml``: :func:`axolotl_config` with a header saying how to use it."""
    body = axolotl_config(alloc, adapter_dir, base_config=base_config, weights=weights)
    header = [
        f"axolotl (keys checked against axolotl v{AXOLOTL_VERSION}): senslora's per-matrix LoRA ranks",
        f"for {alloc.model or 'the allocated model'} ({len(alloc.matrices)} matrices, recipe {alloc.recipe}).",
        "Merge these keys into your axolotl config (base_model, datasets, training arguments).",
    ]
    if "lora_model_dir" in body:
        why = "its weights were initialised" if weights else "axolotl's schema takes integer alphas only"
        header += [
            f"lora_model_dir loads the saved adapter trainable ({why}); its adapter_config.json then",
            "governs every rank and alpha, and the patterns below must stay equal to it.",
        ]
    if "lora_alpha" not in body:
        header.append("lora_alpha / lora_alpha_pattern are left out (not integers); axolotl warns that they differ.")
    return _dump(header, body)


def llamafactory_config(adapter_dir: str | Path, quantized: str = "") -> dict[str, Any]:
    """The LLaMA-Factory keys that make it resume (train) the saved adapter, on the model quantised
    as it was allocated (``quantization_bit``, bitsandbytes) when it was."""
    body: dict[str, Any] = {"finetuning_type": "lora", "adapter_name_or_path": str(adapter_dir), "create_new_adapter": False}
    if quantized in ("4bit", "8bit"):
        body["quantization_bit"] = int(quantized[0])
    return body


def llamafactory_yaml(alloc, adapter_dir: str | Path) -> str:
    """``llamafactory.yaml``: :func:`llamafactory_config` with a header saying how to use it."""
    header = [
        f"LLaMA-Factory (keys checked against LLaMA-Factory v{LLAMAFACTORY_VERSION}): train senslora's adapter,",
        f"{len(alloc.matrices)} matrices at their allocated ranks, for {alloc.model or 'the allocated model'}.",
        "LLaMA-Factory reads per-module ranks only from a saved adapter: it resumes the last adapter of",
        "adapter_name_or_path trainable, so lora_rank / lora_alpha / lora_target are not used.",
        "Merge these keys into your LLaMA-Factory config (model_name_or_path, stage: sft, dataset, ...).",
    ]
    return _dump(header, llamafactory_config(adapter_dir, alloc.quantized))


def write_exports(folder: Path, alloc, adapter_dir: str | Path, *, base_config=None, weights: bool = False) -> None:
    """Write ``axolotl.yaml`` and ``llamafactory.yaml`` into ``folder``, pointing at ``adapter_dir``."""
    (folder / AXOLOTL_FILE).write_text(axolotl_yaml(alloc, adapter_dir, base_config=base_config, weights=weights))
    (folder / LLAMAFACTORY_FILE).write_text(llamafactory_yaml(alloc, adapter_dir))
