"""`senslora allocate` through the CLI: outputs, determinism, and every bad input of issue 2."""

import json
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_bert_with_minilm_tokenizer

from senslora.cli.main import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random BERT classifier saved as an HF folder with the real MiniLM tokenizer."""
    folder = tmp_path_factory.mktemp("models") / "tiny-bert"
    return save_tiny_bert_with_minilm_tokenizer(
        folder, max_position_embeddings=128, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


def base_args(model, out, *extra):
    return [
        "allocate",
        "--model",
        str(model),
        "--calib",
        "movie",
        "--calib-samples",
        "16",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--avg-rank",
        "2",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def test_allocate_writes_the_three_outputs(tiny_folder, tmp_path, capsys):
    from peft import LoraConfig

    out = tmp_path / "alloc"
    code, err = run(base_args(tiny_folder, out), capsys)
    assert code == 0, err
    data = json.loads((out / "allocation.json").read_text())
    assert len(data["matrices"]) == 12 and data["total_rank"] == 24
    for key in ("name", "shape", "s_global", "s_topk", "s_eff", "theta", "rank", "params"):
        assert key in data["matrices"][0]
    for key in ("estimation", "metrics", "allocation"):
        assert data["timings"][key] >= 0
    assert "forward" not in data["timings"]  # the reference pass is opt-in (--measure-forward)
    assert data["calibration"]["tokens"] > 16 and set(data["weights"]) == {
        "beta1",
        "beta2",
        "gamma1",
        "gamma2",
    }
    cfg = LoraConfig.from_pretrained(str(out / "lora_config"))
    assert cfg.task_type == "SEQ_CLS" and len(cfg.rank_pattern) == 12
    assert (out / "ranks.png").stat().st_size > 1000
    import yaml  # the trainers' snippets point at the adapter allocate writes

    assert yaml.safe_load((out / "llamafactory.yaml").read_text())["adapter_name_or_path"] == str(
        out.resolve() / "adapter"
    )
    assert len(yaml.safe_load((out / "axolotl.yaml").read_text())["lora_rank_pattern"]) == 12


def test_measure_forward_times_the_reference_pass(tiny_folder, tmp_path, capsys):
    out = tmp_path / "alloc"
    code = main(base_args(tiny_folder, out, "--measure-forward"))
    printed = capsys.readouterr().out
    assert code == 0
    timings = json.loads((out / "allocation.json").read_text())["timings"]
    assert timings["forward"] > 0 and timings["ratio_to_forward"] == pytest.approx(
        timings["total"] / timings["forward"]
    )
    assert f"allocation took {timings['total']:.2f} s ({timings['ratio_to_forward']:.2f}x one plain forward" in printed


def test_same_seed_gives_byte_identical_ranks(tiny_folder, tmp_path, capsys):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert (
            run(
                base_args(
                    tiny_folder, out, "--seed", "7", "--estimator", "fisher", "--label-column", "label"
                ),
                capsys,
            )[0]
            == 0
        )
    ranks = [
        json.dumps(
            {m["name"]: m["rank"] for m in json.loads((o / "allocation.json").read_text())["matrices"]}
        )
        for o in outs
    ]
    assert ranks[0] == ranks[1]
    cfgs = [(o / "lora_config" / "adapter_config.json").read_bytes() for o in outs]
    assert cfgs[0] == cfgs[1]


def _nan_folder(tiny_folder, tmp_path):
    import shutil

    from transformers import BertForSequenceClassification

    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_folder, folder)
    model = BertForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    return folder


BAD = {
    "missing model path": (lambda f, t: ["--model", str(t / "nope")], "neither a known alias"),
    "not an HF folder": (lambda f, t: ["--model", str(t)], "config.json"),
    "unknown alias": (lambda f, t: ["--model", "gpt-17"], "not a known alias (minilm, smollm2)"),
    "no target matches": (lambda f, t: ["--targets", "does_not_exist"], "no target matrix"),
    "unknown estimator": (lambda f, t: ["--estimator", "magic"], "unknown estimator"),
    "unknown calib alias": (lambda f, t: ["--calib", "imdb"], "imdb"),
    "avg rank below r-min": (lambda f, t: ["--avg-rank", "1", "--r-min", "2"], "below --r-min"),
    "avg rank above r-max": (lambda f, t: ["--avg-rank", "3", "--r-max", "2"], "above the largest rank"),
    "max length too small": (lambda f, t: ["--max-length", "4"], "--max-length"),
    "fisher without labels": (
        lambda f, t: ["--estimator", "fisher", "--calib", str(_text_file(t))],
        "needs labelled",
    ),
    "empty calibration set": (lambda f, t: ["--calib", str(_text_file(t, ""))], "empty"),
    "NaN in a diagonal": (lambda f, t: ["--model", str(_nan_folder(f, t))], "non-finite"),
}


def _text_file(tmp_path, text="a good film\na bad film\n"):
    path = tmp_path / "calib.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_no_output(case, tiny_folder, tmp_path, capsys):
    make_extra, message = BAD[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    code, err = run(base_args(tiny_folder, out) + make_extra(tiny_folder, inputs), capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("senslora: error")]
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left


def test_existing_output_folder_is_refused_without_overwrite(tiny_folder, tmp_path, capsys):
    out = tmp_path / "alloc"
    out.mkdir()
    code, err = run(base_args(tiny_folder, out), capsys)
    assert code == 2 and "already exists" in err
    assert run(base_args(tiny_folder, out, "--overwrite"), capsys)[0] == 0
    assert (out / "allocation.json").exists()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["allocate", "--out", "x", "--calib-samples", "-3"])
    assert exc.value.code == 2
