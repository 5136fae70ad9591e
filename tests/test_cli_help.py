"""``--help`` of every subcommand shows every flag's default, once."""

from __future__ import annotations

import argparse
import re

import pytest

from senslora.cli.main import build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_shows_every_default_once(command):
    sub = _subparsers()[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.nargs == 0 or not action.option_strings:  # on/off flags, --help, positionals
            continue
        assert action.help, (command, action.dest)  # argparse shows nothing for a flag without help
        text = formatter._get_help_string(action) % {"default": action.default}
        assert len(re.findall(r"default", text, flags=re.IGNORECASE)) == 1, (command, action.dest, text)
    sub.format_help()  # formats (no stray % in a help text)


def test_help_names_the_papers_not_internal_seed_numbers():
    """The related systems are named by their papers (TsqLoRA; layer-wise LoRA with CKA)."""
    text = build_parser().format_help() + "".join(sub.format_help() for sub in _subparsers().values())
    assert not re.search(r"\bseeds? ?/?0\d\d\b", text), re.search(r".*\bseeds? ?/?0\d\d\b.*", text).group(0)
    assert "TsqLoRA paper" in text and "layer-wise LoRA with CKA" in text
