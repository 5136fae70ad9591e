"""``--config FILE.yaml`` for allocate, train and bench: keys are the flags, the command line
overrides the file, bad keys and values fail as the flag would (one line, nothing written), and
the config.yaml ``allocate`` records repeats the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import save_tiny_bert_with_minilm_tokenizer

from senslora.cli.configfile import expand_config
from senslora.cli.main import build_parser, main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_bert_with_minilm_tokenizer(tmp_path_factory.mktemp("models") / "tiny-bert")


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def ranks(out: Path) -> dict[str, int]:
    return {m["name"]: m["rank"] for m in json.loads((out / "allocation.json").read_text())["matrices"]}


def run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("senslora:")]
    return code, "\n".join(lines)


def allocate_keys(model: Path) -> dict:
    return {
        "model": str(model),
        "calib-samples": 16,  # dashes or underscores, as the flags are spelled or as they fill
        "max_length": 32,
        "avg-rank": 2,
        "estimator": "fisher",
        "label_column": "label",
        "no-plot": True,
        "no_progress": True,
    }


def test_keys_become_the_flags_before_the_command_lines_own(tmp_path):
    cfg = write(tmp_path / "c.yaml", {"avg_rank": 3, "no-plot": True})
    parser = build_parser()
    assert expand_config(parser, ["allocate", "--config", str(cfg), "--avg-rank", "2"])[1:4] == ["--avg-rank", "3", "--no-plot"]
    train_cfg = write(tmp_path / "t.yaml", {"avg_rank": 3, "eval_each_epoch": False, "option": {"plot": False}})
    train = expand_config(parser, ["train", f"--config={train_cfg}"])
    assert train[:6] == ["train", "--avg-rank", "3", "--no-eval-each-epoch", "--option", "plot=false"]
    args = parser.parse_args(expand_config(parser, ["allocate", "--config", str(cfg), "--avg-rank", "2", "--out", "x"]))
    assert args.avg_rank == 2.0 and args.no_plot  # the command line wins; the file fills the rest
    assert expand_config(parser, ["allocate", "--out", "x"]) == ["allocate", "--out", "x"]


def test_allocate_records_its_config_and_the_record_repeats_the_run(tiny_folder, tmp_path, capsys):
    cfg = write(tmp_path / "allocate.yaml", allocate_keys(tiny_folder))
    first = tmp_path / "first"
    assert run(["allocate", "--config", cfg, "--seed", "3", "--out", first], capsys)[0] == 0
    record = yaml.safe_load((first / "config.yaml").read_text())
    assert record["seed"] == 3 and record["calib_samples"] == 16 and record["estimator"] == "fisher"
    assert "out" not in record and "overwrite" not in record and "config_file" not in record
    again = tmp_path / "again"
    assert run(["allocate", "--config", first / "config.yaml", "--out", again], capsys)[0] == 0
    assert ranks(again) == ranks(first)
    assert (again / "config.yaml").read_text() == (first / "config.yaml").read_text()
    other = tmp_path / "other"  # and the command line still overrides the record
    assert run(["allocate", "--config", first / "config.yaml", "--avg-rank", "3", "--out", other], capsys)[0] == 0
    assert sum(ranks(other).values()) == 3 * len(ranks(first))


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"avg_rnk": 2}, "unknown key 'avg_rnk' for senslora allocate; did you mean avg_rank?"),
        ({"colour": "x"}, "unknown key 'colour' for senslora allocate; see `senslora allocate --help`"),
        ({"avg_rank": "two"}, "avg_rank: --avg-rank: expected a number, got 'two'"),
        ({"calib_samples": 0}, "calib_samples: --calib-samples: expected a positive integer, got 0"),
        ({"calib_samples": True}, "calib_samples: --calib-samples takes one value, found true/false True"),
        ({"estimator": ["fisher"]}, "--estimator takes one value, found list"),
        ({"sink": "drop-all"}, "sink: --sink: invalid choice: 'drop-all' (choose from 'keep', 'drop')"),
        ({"no_plot": "yes please"}, "no_plot: --no-plot is on or off: write true or false"),
        ({"avg_rank": -1}, "--avg-rank must be"),  # out of range: the library's check, as for the flag
        ("- a\n- b\n", "must hold a mapping of flag names to values, found list"),
        ("avg_rank: [1\n", "is not valid YAML (line 2"),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(tiny_folder, tmp_path, capsys, keys, message):
    data = {**allocate_keys(tiny_folder), **keys} if isinstance(keys, dict) else keys
    cfg = write(tmp_path / "bad.yaml", data)
    out = tmp_path / "out"
    code, err = run(["allocate", "--config", cfg, "--out", out], capsys)
    assert code == 2 and err.count("\n") == 0 and err.startswith("senslora: error: ") and message in err, err
    assert not out.exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    code, err = run(["train", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err == f"senslora: error: --config {tmp_path / 'nope.yaml'} does not exist"


def test_train_reads_every_field_and_options_from_a_config(tmp_path):
    cfg = write(
        tmp_path / "train.yaml",
        {"method": "senslora", "task": "chat-qa", "epochs": 2, "lr": 1e-3, "option": ["plot=false"], "layers": "cka"},
    )
    from senslora.cli.recipes import config_from_args

    parser = build_parser()
    args = parser.parse_args(expand_config(parser, ["train", "--config", str(cfg), "--out", "x", "--option", "eva_rho=2"]))
    config = config_from_args(args)
    assert (config.method, config.task, config.epochs, config.lr) == ("senslora", "chat-qa", 2, 1e-3)
    assert config.options["plot"] is False and config.options["eva_rho"] == 2
    assert config.options["layer_select"] == "cka"


def test_bench_takes_its_flags_from_a_config_and_its_benchmark_on_the_command_line(tmp_path, capsys):
    cfg = write(tmp_path / "bench.yaml", {"out": str(tmp_path / "results"), "dry-run": True})
    code = main(["bench", "benchmarks/quick.yaml", "--config", str(cfg)])
    assert code == 0 and "would run" in capsys.readouterr().out and not (tmp_path / "results" / "runs").exists()
    write(cfg, {"config": "benchmarks/quick.yaml"})
    code, err = run(["bench", "--config", cfg, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "unknown key 'config' for senslora bench" in err
