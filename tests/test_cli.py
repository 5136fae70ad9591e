"""The CLI surface stays in step with the registries (like litgpt's config-hub test)."""

import pytest

from senslora.cli.main import build_parser
from senslora.training.methods import METHODS, load_all


def test_train_help_names_every_registered_method(capsys):
    load_all()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in METHODS:
        assert name in text


def test_every_subcommand_has_help(capsys):
    for command in ("allocate", "train", "evaluate", "layers", "select-data", "bench", "report"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([command, "--help"])
        assert exc.value.code == 0
        assert "usage: senslora " + command in capsys.readouterr().out
