"""PEFT's read of transformers' deprecated ``is_gradient_checkpointing`` is silenced where PEFT wraps
a model, and only there: other warnings stay visible."""

from __future__ import annotations

import warnings

from tiny import tiny_llama

from senslora.training.methods.base import peft_wrapping, wrap_peft

MESSAGE = "is_gradient_checkpointing"


def _config():
    from peft import LoraConfig

    return LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")


def _caught(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


def test_plain_peft_warns_and_ours_does_not():
    from peft import get_peft_model

    assert any(MESSAGE in m for m in _caught(lambda: get_peft_model(tiny_llama(), _config())))  # the source
    assert not any(MESSAGE in m for m in _caught(lambda: wrap_peft(tiny_llama(), _config())))


def test_other_warnings_stay_visible():
    def other():
        with peft_wrapping():
            warnings.warn("a real problem", FutureWarning, stacklevel=1)
            warnings.warn(f"`{MESSAGE}` is deprecated", UserWarning, stacklevel=1)

    assert len(_caught(other)) == 2


def test_the_cli_prints_senslora_warnings_as_one_line_and_leaves_others_alone(capsys):
    from senslora import SensloraWarning
    from senslora.cli.main import _show_warnings

    with warnings.catch_warnings(record=True) as others:
        warnings.simplefilter("always")
        _show_warnings()
        _show_warnings()  # idempotent: one line per warning, not two
        warnings.warn("the preset's init fell back", SensloraWarning, stacklevel=1)
        warnings.warn("a library's deprecation", FutureWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err == "senslora: warning: the preset's init fell back\n"
    assert [str(w.message) for w in others] == ["a library's deprecation"]  # Python's own handling
