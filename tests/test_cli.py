"""The CLI surface: `senslora train`'s flags are TrainConfig's fields, and every subcommand has help."""

import argparse
from dataclasses import fields

import pytest

from senslora.cli.main import build_parser, main
from senslora.cli.recipes import config_from_args
from senslora.training.config import TrainConfig


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def test_every_config_field_is_exactly_one_train_flag_with_the_field_help():
    train = _subparser("train")
    flags = [a for a in train._actions if a.option_strings]
    for f in fields(TrainConfig):
        with_help = [a for a in flags if a.help == f.metadata["help"]]
        assert len(with_help) == 1, (f.name, [a.option_strings for a in with_help])
        assert with_help[0].dest == f.name, (f.name, with_help[0].option_strings)
    dests = [a.dest for a in flags]
    assert len(dests) == len(set(dests)), sorted(d for d in dests if dests.count(d) > 1)


def test_train_flags_keep_their_names():
    """Fields generate the flags; the flag names users type stay what they were."""
    expected = (
        "--config --method --task --data-format --text-column --text-pair-column --label-column --problem --loose-labels "
        "--split-seed --max-train-samples --max-eval-samples --model --device --dtype --lr --batch-size "
        "--eval-batch-size --epochs --max-length --max-new-tokens --warmup-ratio --weight-decay "
        "--max-grad-norm --lora-dropout --seed --calib-samples --save-every --keep-checkpoints "
        "--no-eval-each-epoch --eval-split --avg-rank --preset --estimator --sink --token-trim --saliency "
        "--score --fusion --strategy --temperature --normalize --rho --categories --topk-fraction --alpha "
        "--r-min --r-max --budget --targets --target-names --lora-alpha --alpha-mode --init --init-step --num-probes "
        "--accumulate-on --layers --layer-ratio --data-select --data-keep --option --out --resume "
        "--overwrite --no-progress -h --help"
    ).split()
    train = _subparser("train")
    assert sorted(train._option_string_actions) == sorted(expected)


def test_parsed_train_defaults_are_train_config_defaults():
    args = build_parser().parse_args(["train", "--out", "run"])
    default = TrainConfig()
    config = config_from_args(args)
    for f in fields(TrainConfig):
        if f.name == "options":  # filled from the allocation / selection flags, checked below
            continue
        assert getattr(args, f.name) == getattr(default, f.name), f.name
        assert getattr(config, f.name) == getattr(default, f.name), f.name
    config.validate()  # the flags' defaults are acceptable options of the default method
    assert config.options["budget_mode"] == "params"  # train compares methods at equal parameters


def test_train_flags_fill_the_config_and_its_options():
    argv = ["train", "--out", "run", "--method", "senslora", "--no-eval-each-epoch", "--keep-checkpoints"]
    argv += ["--layers", "cka", "--layer-ratio", "0.3", "--data-select", "quality", "--data-keep", "0.7"]
    argv += ["--rho", "0", "--target-names", "query, value", "--budget", "rank", "--option", "eva_rho=2"]
    config = config_from_args(build_parser().parse_args(argv))
    assert (config.method, config.eval_each_epoch, config.keep_checkpoints) == ("senslora", False, True)
    options = config.options
    assert (options["layer_select"], options["layer_ratio"]) == ("cka", 0.3)
    assert (options["data_select"], options["data_keep"]) == ("quality", 0.7)
    assert (options["rho"], options["budget_mode"], options["eva_rho"]) == (0, "rank", 2)
    assert options["target_modules"] == ["query", "value"] and options["estimator"] is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "lorra"], "unknown method 'lorra'"),
        (["--dtype", "float8"], "dtype 'float8' is not supported"),
        (["--option", "eva_rho=2"], "method lora reads no option 'eva_rho'"),
    ],
)
def test_names_the_library_checks_are_one_error_line_exit_2(flags, message, tmp_path, capsys):
    """--method and --dtype list their registry's names but are checked by the library (its message)."""
    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("senslora: error") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags", [["--eval-split", "dev"], ["--layers", "some"], ["--epochs", "0"], ["--lr", "nan"]]
)
def test_parse_errors_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "run", *flags])
    assert exc.value.code == 2
    assert "senslora train: error: argument" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    for command in ("allocate", "train", "evaluate", "layers", "select-data", "bench", "report"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([command, "--help"])
        assert exc.value.code == 0
        assert "usage: senslora " + command in capsys.readouterr().out
