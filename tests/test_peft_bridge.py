import math
import re

import pytest
from peft import LoraConfig, get_peft_model
from tiny import tiny_bert, tiny_llama

from senslora.core.errors import SensloraError
from senslora.core.peft_bridge import peft_ranks, peft_scalings, ranks_to_lora_config
from senslora.core.targets import find_targets


def _ranks_for(model, seed=0):
    names = [t.name for t in find_targets(model)]
    return {n: (i * 7 + seed) % 5 + 1 for i, n in enumerate(names)}


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("mode", ["proportional", "constant", "rslora"])
def test_peft_builds_exactly_the_allocated_ranks(make, mode):
    model = make()
    ranks = _ranks_for(model)
    cfg = ranks_to_lora_config(ranks, LoraConfig(r=4, lora_alpha=8), alpha_mode=mode)
    peft_model = get_peft_model(model, cfg)
    assert peft_ranks(peft_model) == ranks
    scalings = peft_scalings(peft_model)
    for name, r in ranks.items():
        # The scaling each mode promises, written out (uniform reference r = 4, alpha = 8):
        # proportional alpha/r = 2 at every rank; constant 8 / r_w; rsLoRA 8 / sqrt(r_w).
        want = {"proportional": 2.0, "constant": 8 / r, "rslora": 8 / math.sqrt(r)}[mode]
        assert math.isclose(scalings[name], want), (name, r, scalings[name], want)


def test_rank_zero_drops_the_module_and_saved_config_round_trips(tmp_path):
    model = tiny_bert()
    ranks = _ranks_for(model)
    dropped = next(iter(ranks))
    ranks[dropped] = 0
    cfg = ranks_to_lora_config(ranks, LoraConfig(r=4, lora_alpha=8))
    assert dropped not in cfg.target_modules
    cfg.save_pretrained(str(tmp_path))
    loaded = LoraConfig.from_pretrained(str(tmp_path))
    built = peft_ranks(get_peft_model(tiny_bert(), loaded))
    assert built == {k: v for k, v in ranks.items() if v > 0}


def test_keys_are_escaped_full_names_that_do_not_match_siblings():
    # layer 1 must not match layer 11 / 10 etc.: keys are full, escaped names.
    model = tiny_bert(num_hidden_layers=12)
    ranks = _ranks_for(model)
    cfg = ranks_to_lora_config(ranks, LoraConfig(r=4, lora_alpha=8))
    assert set(cfg.rank_pattern) == {re.escape(name) for name in ranks}
    assert peft_ranks(get_peft_model(model, cfg)) == ranks


def test_all_zero_and_bad_mode_are_user_errors():
    with pytest.raises(SensloraError):
        ranks_to_lora_config({"a": 0})
    with pytest.raises(SensloraError):
        ranks_to_lora_config({"a": 1}, alpha_mode="nope")
