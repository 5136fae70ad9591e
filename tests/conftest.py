"""Shared test set-up: the opt-in ``slow`` tier and a tiny offline word-level tokenizer."""

from __future__ import annotations

import os

import pytest

WORDS = (
    "[UNK] <s> </s> the a film is good bad great awful user assistant what why ? . , ! hello world "
    "very not one two three four five six seven eight nine ten"
).split()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``slow`` unless SENSLORA_SLOW=1, and tests marked ``cuda`` without a CUDA
    device (scripts/gpu-check.sh runs those)."""
    slow = os.environ.get("SENSLORA_SLOW") != "1"
    cuda = any("cuda" in item.keywords for item in items) and not _cuda_available()
    for item in items:
        if slow and "slow" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="slow tier: set SENSLORA_SLOW=1 to run"))
        if cuda and "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (scripts/gpu-check.sh)"))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def make_word_tokenizer(*, bos: bool = True, chat_template: str | None = None):
    """A whitespace word-level fast tokenizer over :data:`WORDS` (one token per word), EOS ``</s>``,
    no pad token; with ``bos`` it prepends ``<s>`` to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@pytest.fixture
def word_tokenizer():
    """Factory fixture for :func:`make_word_tokenizer`."""
    return make_word_tokenizer
