"""``--model FILE.gguf``: dequantised once into the cache (keyed by the file's SHA-256), verified,
rebuilt if damaged; unsupported architectures and tensor types are one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny import write_tiny_llama_gguf

from senslora.cli.main import main
from senslora.core.cache import MANIFEST_NAME, check_manifest, sha256_file
from senslora.core.errors import SensloraError
from senslora.data import models
from senslora.data.models import load_model, resolve_model_path


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("SENSLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A tiny F32 LLaMA GGUF file and the model it was written from."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_llama_gguf(path)


def test_gguf_file_loads_with_its_weights_and_tokenizer(cache, gguf_file):
    path, reference = gguf_file
    before = sha256_file(path)
    model, tok = load_model(str(path), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    for name, value in reference.state_dict().items():  # F32: exactly the written weights
        assert torch.equal(model.state_dict()[name], value), name
    assert tok.eos_token == "</s>" and tok(" the").input_ids[-2:] == [259, 68]  # "Ġth", "e": its merges
    folder = Path(resolve_model_path(path))
    assert folder.parent == cache / "models" / "gguf" and folder.name == f"tiny-llama.F32-{before[:16]}"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["source_sha256"] == before and "quantization_config" not in json.loads(
        (folder / "config.json").read_text()
    )
    assert sha256_file(path) == before  # the input is only read


def test_gguf_cache_reused_rebuilt_and_folder_form(cache, gguf_file, monkeypatch, caplog, tmp_path):
    path, _ = gguf_file
    folder = Path(models.gguf_model_path(path))
    built = []
    real_build = models._build_from_gguf
    monkeypatch.setattr(models, "_build_from_gguf", lambda *a: (built.append(a[0]), real_build(*a)))
    assert models.gguf_model_path(path) == str(folder) and built == []  # verified, reused
    (folder / "config.json").write_text('{"model_type": "evil"}')
    with caplog.at_level(logging.WARNING, logger="senslora.data.models"):
        assert models.gguf_model_path(path) == str(folder)
    assert len(built) == 1 and built[0] != folder and "config.json" in caplog.text
    assert check_manifest(folder) is None
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == [folder.name]
    # A folder holding exactly one .gguf file (and no config.json) is that file.
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / path.name).symlink_to(path)
    assert resolve_model_path(holder) == str(folder)
    (holder / "other.gguf").write_bytes(b"x")
    with pytest.raises(SensloraError, match="holds 2 GGUF files .*pass one of them"):
        resolve_model_path(holder)


def _leftovers(cache: Path) -> list[str]:
    root = cache / "models" / "gguf"
    return [p.name for p in root.iterdir() if not p.name.endswith(".lock")] if root.exists() else []


def test_unsupported_architecture_is_one_line(cache, tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_llama_gguf(path, architecture="no-such-arch")
    with pytest.raises(SensloraError, match="architecture 'no-such-arch'.*cannot load from GGUF.*llama"):
        resolve_model_path(path)
    assert _leftovers(cache) == []


def test_unsupported_tensor_type_is_one_line(cache, tmp_path):
    import gguf

    path = tmp_path / "f64.gguf"
    write_tiny_llama_gguf(path, raw_type=gguf.GGMLQuantizationType.F64)
    with pytest.raises(SensloraError, match="quantisation type.*F64.*cannot dequantise"):
        resolve_model_path(path)
    assert _leftovers(cache) == []


def test_cli_not_a_gguf_file(cache, tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    code = main(["allocate", "--model", str(bad), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("senslora: error: cannot load the GGUF file")
    assert str(bad) in err[0] and not (tmp_path / "out").exists()
    assert bad.read_bytes() == b"not a gguf file at all"


def test_cli_allocate_on_a_gguf_file(cache, gguf_file, tmp_path, capsys):
    path, _ = gguf_file
    out = tmp_path / "alloc"
    args = ["allocate", "--model", str(path), "--calib", "chat", "--calib-samples", "8", "--max-length", "32"]
    code = main(
        [*args, "--avg-rank", "2", "--no-progress", "--no-plot", "--device", "cpu", "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "allocation.json").read_text())
    assert len(data["matrices"]) == 14 and data["model"] == str(path)
