"""Hub names: ``--model org/name`` resolves to its snapshot in the Hugging Face cache (offline here:
HF_HUB_OFFLINE=1 and a fake cache folder); not cached and offline is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_llama

from senslora.cli.main import main
from senslora.core.errors import SensloraError
from senslora.data import guard
from senslora.data.models import is_local_spec, load_model, resolve_model_path

REV = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_cache(hub: Path, word_tokenizer) -> Path:
    """``hub/models--org--tiny/snapshots/<rev>/`` holding a tiny saved LLaMA, ``refs/main`` -> rev."""
    repo = hub / "models--org--tiny"
    snapshot = repo / "snapshots" / REV
    tiny_llama().save_pretrained(snapshot)
    word_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    return snapshot


@pytest.fixture
def offline_hub(monkeypatch, tmp_path, word_tokenizer) -> Path:
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    snapshot = _fake_hub_cache(hub, word_tokenizer)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


@pytest.mark.parametrize(
    ("spec", "local"),
    [
        ("org/name", False),
        ("gpt2", False),
        ("./org/name", True),
        ("/abs/x", True),
        ("a/b/c", True),
        ("x.gguf", True),
        ("minilm", False),
    ],
)
def test_what_counts_as_a_local_path(spec, local):
    assert is_local_spec(spec) is local


def test_cached_hub_name_loads_offline(offline_hub):
    assert Path(resolve_model_path("org/tiny")) == offline_hub
    model, tok = load_model("org/tiny", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.eos_token == "</s>"
    assert guard.model_input("org/tiny") == ("the model folder", None)  # the HF cache is not an input


def test_uncached_hub_name_offline_is_one_line(offline_hub, tmp_path, capsys):
    with pytest.raises(
        SensloraError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set.*--model DIR"
    ):
        resolve_model_path("org/missing")
    code = main(["allocate", "--model", "org/missing", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "hf download org/missing --local-dir DIR" in err[0]
    assert not (tmp_path / "out").exists()


def test_hf_home_is_honoured_by_the_cli(tmp_path, word_tokenizer):
    """The environment as a user sets it (HF_HOME, HF_HUB_OFFLINE), read by a fresh process."""
    _fake_hub_cache(tmp_path / "hf" / "hub", word_tokenizer)
    out = tmp_path / "alloc"
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "SENSLORA_CACHE": str(tmp_path),
    }
    env.pop("HF_HUB_CACHE", None)
    args = ["--calib", "chat", "--calib-samples", "4", "--max-length", "16", "--avg-rank", "1", "--no-plot"]
    cmd = [
        sys.executable,
        "-m",
        "senslora",
        "allocate",
        "--model",
        "org/tiny",
        *args,
        "--no-progress",
        "--device",
        "cpu",
    ]
    proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "allocation.json").read_text())["model"] == "org/tiny"
