"""Big-model calibration: weights offloaded by accelerate (here to disk) give the same allocation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_word_tokenizer
from tiny import tiny_llama, token_batches

from senslora.cli.main import main
from senslora.core.errors import SensloraWarning
from senslora.core.losses import input_device, offloaded
from senslora.core.pipeline import allocate
from senslora.data.models import load_model


@pytest.fixture
def llama_folder(tmp_path):
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return folder


# Block 1 lives on disk: accelerate loads its weights for each forward pass only.
DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def test_activation_allocation_with_a_block_on_disk_equals_the_in_memory_one(llama_folder, tmp_path):
    plain, _ = load_model(llama_folder, device="cpu")
    batches = token_batches(3, batch_size=4, labels="lm")
    reference = allocate(plain, batches, avg_rank=2, progress=False)
    big, _ = load_model(llama_folder, device_map=DISK_MAP, offload_folder=tmp_path / "offload")
    assert offloaded(big) and not offloaded(plain)
    assert input_device(big) == torch.device("cpu")
    # The offloaded block's weights are not in memory between forward passes.
    assert big.model.layers[1].self_attn.q_proj.weight.device == torch.device("meta")
    # The default's gradient init needs a backward pass the offloaded block has not: zero instead.
    with pytest.warns(SensloraWarning, match="cannot run: the model has offloaded"):
        got = allocate(big, batches, avg_rank=2, progress=False)
    assert (reference.init, got.init) == ("gradient", "zero") and got.init_fallback
    assert got.ranks == reference.ranks
    for a, b in zip(got.matrices, reference.matrices, strict=True):
        assert (a.name, a.s_global, a.s_topk) == (
            b.name,
            pytest.approx(b.s_global, rel=1e-5),
            pytest.approx(b.s_topk, rel=1e-5),
        )


def test_cli_device_map_offloads_and_refuses_gradient_estimators(llama_folder, tmp_path, capsys):
    (tmp_path / "calib.txt").write_text("hello world\nthe cat sat on the mat\n" * 8)
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(DISK_MAP))
    common = [
        "allocate",
        "--model",
        str(llama_folder),
        "--calib",
        str(tmp_path / "calib.txt"),
        "--calib-samples",
        "8",
        "--avg-rank",
        "2",
        "--no-progress",
        "--device-map",
        str(map_file),
        "--offload-folder",
        str(tmp_path / "off"),
    ]
    out = tmp_path / "alloc"
    assert main([*common, "--out", str(out)]) == 0
    saved = json.loads((out / "allocation.json").read_text())
    assert len(saved["matrices"]) == 14 and saved["init"] == "zero" and "offloaded" in saved["init_fallback"]
    printed = capsys.readouterr()
    said = printed.out
    # The library's SensloraWarning reaches the terminal as one line in the CLI's format.
    assert "senslora: warning: the robust preset's --init gradient cannot run: the model has offloaded" in printed.err
    assert "UserWarning" not in printed.err
    assert "adapter init zero (PEFT's; the robust preset's init could not run: the model has offloaded" in said
    for init, why in [("gradient", "which have no backward pass"), ("pissa", "whose weights it needs")]:
        code = main([*common, "--init", init, "--out", str(tmp_path / "alloc3")])  # named: an error
        assert code == 2 and not (tmp_path / "alloc3").exists()
        assert f"--init {init} cannot run: the model has offloaded (cpu/disk) blocks, {why}" in capsys.readouterr().err
    code = main([*common, "--estimator", "fisher", "--out", str(tmp_path / "alloc2")])
    assert code == 2 and not (tmp_path / "alloc2").exists()
    assert "activation" in capsys.readouterr().err
