"""axolotl.yaml and llamafactory.yaml: what they say equals the allocation's LoraConfig."""

import re

import pytest
import yaml
from peft import LoraConfig, get_peft_model
from tiny import tiny_llama, token_batches

from senslora.core.exports import (
    AXOLOTL_FILE,
    LLAMAFACTORY_FILE,
    axolotl_config,
    axolotl_yaml,
    llamafactory_yaml,
)
from senslora.core.peft_bridge import peft_ranks
from senslora.core.pipeline import allocate


@pytest.fixture(scope="module")
def alloc():
    return allocate(tiny_llama(), token_batches(labels="lm"), avg_rank=2, progress=False, model_name="tiny")


def _as_lora_config(keys: dict) -> LoraConfig:
    """What axolotl builds from the keys (axolotl forwards them to PEFT one to one)."""
    return LoraConfig(
        r=keys["lora_r"],
        lora_alpha=keys["lora_alpha"],
        lora_dropout=keys["lora_dropout"],
        target_modules=keys["lora_target_modules"],
        rank_pattern=keys["lora_rank_pattern"],
        alpha_pattern=keys.get("lora_alpha_pattern", {}),
        use_rslora=keys.get("peft_use_rslora", False),
    )


def test_axolotl_keys_build_exactly_the_allocated_ranks_and_scalings(alloc, tmp_path):
    from senslora.core.peft_bridge import peft_scalings

    keys = yaml.safe_load(axolotl_yaml(alloc, tmp_path / "adapter"))
    assert keys["adapter"] == "lora" and "lora_model_dir" not in keys  # fresh weights: no need to load them
    assert all(type(v) is int for v in [keys["lora_r"], keys["lora_alpha"], *keys["lora_alpha_pattern"].values()])
    assert keys["lora_target_modules"] == list(alloc.ranks)  # in the allocation's order
    assert all(re.escape(name) in keys["lora_rank_pattern"] for name in alloc.ranks)
    built = get_peft_model(tiny_llama(), _as_lora_config(keys))
    ours = get_peft_model(tiny_llama(), alloc.to_lora_config())
    assert peft_ranks(built) == alloc.ranks
    assert peft_scalings(built) == peft_scalings(ours)


def test_axolotl_loads_the_adapter_where_weights_matter_or_alphas_are_not_integers(alloc, tmp_path):
    adapter = tmp_path / "adapter"
    keys = axolotl_config(alloc, adapter, weights=True)
    assert keys["lora_model_dir"] == str(adapter) and "lora_alpha_pattern" in keys
    base = LoraConfig(r=3, lora_alpha=7)  # alpha_w = 7 r_w / 3: not integers
    keys = axolotl_config(alloc, adapter, base_config=base)
    assert keys["lora_model_dir"] == str(adapter)
    assert "lora_alpha" not in keys and "lora_alpha_pattern" not in keys
    assert "left out" in axolotl_yaml(alloc, adapter, base_config=base)


def test_rslora_sets_axolotls_flag(tmp_path):
    alloc = allocate(tiny_llama(), token_batches(labels="lm"), avg_rank=2, alpha_mode="rslora", progress=False)
    keys = axolotl_config(alloc, tmp_path)
    assert keys["peft_use_rslora"] is True and "lora_alpha_pattern" not in keys


def test_llamafactory_resumes_the_saved_adapter(alloc, tmp_path):
    text = llamafactory_yaml(alloc, tmp_path / "adapter")
    assert text.startswith("# LLaMA-Factory (keys checked against LLaMA-Factory v")
    assert yaml.safe_load(text) == {
        "finetuning_type": "lora",
        "adapter_name_or_path": str(tmp_path / "adapter"),
        "create_new_adapter": False,
    }


def test_save_writes_the_snippets_only_when_told_where_the_adapter_is(alloc, tmp_path):
    plain = alloc.save(tmp_path / "a", plot=False)
    assert not (plain / AXOLOTL_FILE).exists()
    out = alloc.save(tmp_path / "b", plot=False, adapter_dir=tmp_path / "b" / "adapter")
    assert yaml.safe_load((out / AXOLOTL_FILE).read_text())["lora_r"] == 2
    assert yaml.safe_load((out / LLAMAFACTORY_FILE).read_text())["adapter_name_or_path"] == str(out / "adapter")
