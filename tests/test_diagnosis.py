"""`senslora diagnose`: the token / channel split of each matrix's sensitivity."""

import json

import numpy as np
import pytest
import torch
from tiny import layer_inputs, save_tiny_bert_with_minilm_tokenizer, tiny_llama, token_batches

from senslora.cli.main import main
from senslora.core.diagnosis import diagnose_activation, diagnose_diagonals, top_share
from senslora.core.estimators import estimate_diagonals
from senslora.core.targets import find_targets


def test_top_share():
    assert top_share(np.array([1.0, 1.0, 1.0, 7.0]), 0.25) == pytest.approx(0.7)
    assert top_share(np.array([5.0] + [0.0] * 199), 0.01) == 1.0  # ceil(1% of 200) = 2 values
    assert top_share(np.zeros(3)) == 0.0


def test_activation_split_matches_the_layer_inputs():
    model = tiny_llama()
    batches = token_batches(2, batch_size=4)
    targets = find_targets(model)
    target = next(t for t in targets if t.name.endswith("layers.1.mlp.down_proj"))
    seen = layer_inputs(model, batches, target.module)
    energy = torch.cat([x[b["attention_mask"].bool()].square().sum(-1) for x, b in zip(seen, batches, strict=True)])
    first = torch.cat([x[:, 0].square().sum(-1) for x in seen])  # right padding: position 0 is real
    report = diagnose_activation(model, batches, targets, fraction=0.1)
    got = report["matrices"][target.name]
    assert got["position0_share"] == pytest.approx(float(first.sum() / energy.sum()), rel=1e-5)
    assert got["top_token_share"] == pytest.approx(top_share(energy.numpy(), 0.1), rel=1e-5)
    # The channel split is the activation diagonal's.
    diag = estimate_diagonals("activation", model, batches, [target], progress=False)
    assert got["top_channel_share"] == pytest.approx(
        diagnose_diagonals(diag, 0.1)[target.name]["top_channel_share"], rel=1e-5
    )
    assert 0 < report["summary"]["lead_share_of_s_global"] <= 1


def test_cli_writes_diagnosis_json(tmp_path, capsys):
    model = save_tiny_bert_with_minilm_tokenizer(tmp_path / "tiny")
    out = tmp_path / "diag"
    argv = ["diagnose", "--model", str(model), "--calib", "movie", "--calib-samples", "8", "--max-length", "16"]
    assert main(argv + ["--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "diagnosis.json").read_text())
    assert set(data) >= {"activation", "fisher"}
    assert len(data["activation"]["matrices"]) == len(data["fisher"]["matrices"]) > 0
    assert "top 5% of matrices hold" in capsys.readouterr().out
    assert main(argv + ["--out", str(tmp_path / "x"), "--estimators", "magic"]) == 2
    assert not (tmp_path / "x").exists()
