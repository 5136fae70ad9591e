"""The code blocks of README.md and of the docs pages moved out of it (docs/CLI.md,
docs/DISTRIBUTED.md, docs/BENCHMARKS.md) are run or parsed, so the docs cannot drift from the code.

- every ``python`` block runs as written (in a scratch folder holding the ``my_data.csv`` and
  ``chats.jsonl`` it reads); the README's TRL block loads SmolLM2, which this test swaps for a
  tiny random LLaMA and a word-level tokenizer with a chat template (the one substitution);
- every senslora command in a ``bash`` block parses with the real CLI parser (subcommand and every
  flag), and the README's main job runs; elided commands (``...``) and placeholders are named here;
- every ``bash scripts/...`` file the docs run exists;
- every relative link and image of README.md and docs/*.md points at a file that exists (and, for
  a ``#heading`` into a Markdown file, at one of its headings).
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest

from senslora.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: The pages whose code blocks are run or parsed (docs/TRAINERS.md's are sketches with ``...``).
DOCS = (README, ROOT / "docs" / "CLI.md", ROOT / "docs" / "DISTRIBUTED.md", ROOT / "docs" / "BENCHMARKS.md")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
#: The README's TRL block loads the real SmolLM2; the test runs it on a tiny model instead.
SMOLLM2 = 'load_model("smollm2", kind="causal-lm")'


def blocks(language: str, pages=DOCS) -> list[tuple[str, str]]:
    """``(page name, body)`` of every block in ``language``."""
    return [
        (page.relative_to(ROOT).as_posix(), body)
        for page in pages
        for lang, body in BLOCK.findall(page.read_text())
        if lang == language
    ]


def shell_commands(pages=DOCS) -> list[str]:
    """Each command of every bash block: continuations joined, comments dropped, split at &&."""
    out = []
    for _, body in blocks("bash", pages):
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


def test_the_docs_have_the_blocks_this_test_reads():
    assert len(blocks("python")) >= 2 and len(shell_commands()) >= 8
    readme = shell_commands([README])
    assert readme == [
        "bash scripts/setup.sh",
        ".venv/bin/senslora allocate --model minilm --calib movie --avg-rank 4 --out runs/alloc-minilm --overwrite",
        "bash scripts/setup.sh",
        ".venv/bin/python -m pytest -q",
    ]
    assert sum(SMOLLM2 in body for _, body in blocks("python", [README])) == 1


@pytest.mark.parametrize("command", [c for c in shell_commands() if senslora_argv(c) is not None])
def test_every_senslora_command_in_the_docs_parses(command):
    argv = senslora_argv(command)
    if "..." in argv:
        pytest.skip("an elided command (the docs write '...')")
    args = build_parser().parse_args(argv)  # SystemExit(2) on an unknown subcommand or flag
    assert callable(args.func)


def test_every_script_the_docs_run_exists():
    scripts = {w for c in shell_commands() for w in shlex.split(c) if w.startswith("scripts/")}
    assert scripts
    for script in scripts:
        assert (ROOT / script).is_file(), script


def test_the_readme_main_job_runs(tmp_path, capsys):
    (main_job,) = [
        c for c in shell_commands([README]) if (a := senslora_argv(c)) and a[0] == "allocate" and "minilm" in a
    ]
    argv = senslora_argv(main_job)
    argv[argv.index("--out") + 1] = str(tmp_path / "alloc")
    assert main([*argv, "--no-progress"]) == 0
    assert (tmp_path / "alloc" / "allocation.json").is_file()
    assert (tmp_path / "alloc" / "lora_config" / "adapter_config.json").is_file()


TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def _tiny_causal_lm(name: str, kind: str):
    """Stands in for ``load_model("smollm2", kind="causal-lm")``: a tiny random LLaMA and a
    word-level tokenizer with a chat template."""
    from conftest import make_word_tokenizer
    from tiny import tiny_llama

    assert (name, kind) == ("smollm2", "causal-lm")
    tok = make_word_tokenizer(bos=False, chat_template=TEMPLATE)
    tok.pad_token = "[UNK]"
    return tiny_llama(vocab_size=len(tok)), tok


def _scratch_data() -> None:
    """The files the blocks read: a labelled CSV, and chats in TRL's messages format."""
    rows = [("a gripping, beautifully acted film", 1), ("dull and far too long", 0)] * 16
    with open("my_data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    words = "one two three four five six seven eight nine ten".split()
    with open("chats.jsonl", "w") as f:
        for i in range(40):
            turns = [{"role": "user", "content": f"what is {words[i % 9]} ?"},
                     {"role": "assistant", "content": words[i % 9 + 1]}]
            f.write(json.dumps({"messages": turns}) + "\n")


RUNNER = """
import sys
sys.path.insert(0, sys.argv[1])
from test_readme import _tiny_causal_lm
with open(sys.argv[2]) as fh:
    code = compile(fh.read(), sys.argv[3], "exec")
exec(code, {"__name__": "readme", "_tiny_causal_lm": _tiny_causal_lm})
"""


@pytest.mark.parametrize("index", range(len(blocks("python"))), ids=lambda i: blocks("python")[i][0])
def test_every_python_block_of_the_docs_runs(index, tmp_path, monkeypatch):
    """Each block in a fresh interpreter: TRL's trainer sets process-wide state (environment
    variables such as ACCELERATE_MIXED_PRECISION) that would leak into later tests."""
    import os
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    _scratch_data()
    page, code = blocks("python")[index]
    (tmp_path / "block.py").write_text(code.replace(SMOLLM2, '_tiny_causal_lm("smollm2", kind="causal-lm")'))
    src = str(ROOT / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(ROOT / "tests"), "block.py", f"{page} python block"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "SFTTrainer" in code:
        from peft import PeftModel

        from senslora.core.peft_bridge import peft_ranks

        loaded = PeftModel.from_pretrained(_tiny_causal_lm("smollm2", "causal-lm")[0], "runs/sft/adapter")
        assert len(set(peft_ranks(loaded).values())) > 1  # the allocated ranks, not one uniform rank


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _links(page: Path) -> list[str]:
    text = BLOCK.sub("", page.read_text())  # links inside code blocks are code
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


PAGES = (README, *sorted((ROOT / "docs").glob("*.md")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_of_the_docs_resolves(page):
    links = [link for link in _links(page) if not re.match(r"[a-z]+:", link)]
    if page == README:
        assert len(links) >= 8 and "results/v3/plots/headline-forest.png" in links
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} -> {target} does not exist"
        if anchor and target.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", BLOCK.sub("", target.read_text()), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading #{anchor} in {target.name}"


def test_import_senslora_is_cheap_and_exports_the_public_api():
    import subprocess
    import sys

    code = (
        "import sys, senslora; assert 'torch' not in sys.modules, 'import senslora loaded torch'; "
        "from senslora import allocate, Allocation, load_model, make_batches, load_examples, sample_examples; "
        "assert allocate.__module__ == 'senslora.core.pipeline'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
