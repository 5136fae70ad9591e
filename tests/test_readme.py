"""README.md's code blocks are run or parsed, so the docs cannot drift from the code.

- every ``python`` block runs as written (in a scratch folder holding the ``my_data.csv`` it reads);
- every senslora command in a ``bash`` block parses with the real CLI parser (subcommand and every
  flag), and the README's main job runs; elided commands (``...``) and placeholders are named here;
- every ``bash scripts/...`` file the README runs exists.
"""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path

import pytest

from senslora.cli.main import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text()) if lang == language]


def shell_commands() -> list[str]:
    """Each command of every bash block: continuations joined, comments dropped, split at &&."""
    out = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


def senslora_argv(command: str) -> list[str] | None:
    """The senslora arguments of a command line (``.venv/bin/senslora ...`` or ``-m senslora ...``)."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word.endswith("bin/senslora"):
            return words[i + 1 :]
        if word == "senslora" and i > 0 and words[i - 1] == "-m":
            return words[i + 1 :]
    return None


def test_readme_has_the_blocks_this_test_reads():
    assert blocks("python") and len(shell_commands()) >= 8


@pytest.mark.parametrize("command", [c for c in shell_commands() if senslora_argv(c) is not None])
def test_every_senslora_command_in_the_readme_parses(command):
    argv = senslora_argv(command)
    if "..." in argv:
        pytest.skip("an elided command (README writes '...')")
    args = build_parser().parse_args(argv)  # SystemExit(2) on an unknown subcommand or flag
    assert callable(args.func)


def test_every_script_the_readme_runs_exists():
    scripts = {w for c in shell_commands() for w in shlex.split(c) if w.startswith("scripts/")}
    assert scripts
    for script in scripts:
        assert (README.parent / script).is_file(), script


def test_the_readme_main_job_runs(tmp_path, capsys):
    (main_job,) = [
        c for c in shell_commands() if (a := senslora_argv(c)) and a[0] == "allocate" and "minilm" in a
    ]
    argv = senslora_argv(main_job)
    argv[argv.index("--out") + 1] = str(tmp_path / "alloc")
    assert main([*argv, "--no-progress"]) == 0
    assert (tmp_path / "alloc" / "allocation.json").is_file()
    assert (tmp_path / "alloc" / "lora_config" / "adapter_config.json").is_file()


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_every_python_block_of_the_readme_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [("a gripping, beautifully acted film", 1), ("dull and far too long", 0)] * 16
    with open("my_data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    exec(compile(blocks("python")[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})


def test_import_senslora_is_cheap_and_exports_the_public_api():
    import subprocess
    import sys

    code = (
        "import sys, senslora; assert 'torch' not in sys.modules, 'import senslora loaded torch'; "
        "from senslora import allocate, Allocation, load_model, make_batches, load_examples, sample_examples; "
        "assert allocate.__module__ == 'senslora.core.pipeline'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
