"""``--config FILE.yaml`` for ``senslora allocate``, ``train`` and ``bench``: one mechanism for all three.

The file is a YAML mapping whose keys are the subcommand's flags, by flag name or by the name
they fill (``avg-rank`` / ``avg_rank``; ``no-eval-each-epoch: true`` or ``eval_each_epoch:
false``; ``option: {plot: false}`` for repeatable ``--option KEY=VALUE``). Its values become
command-line arguments placed before the command line's own, so every value goes through the
same parser and checks as the flag (a flag on the command line overrides the file; repeatable
flags add up). ``null`` leaves a flag at its default. Each value is checked here first against
the flag's type and choices, so that a wrong one is one line naming the file and the key; an
unknown key is one line naming it and the valid keys close to it. Positional arguments (the
benchmark YAML of ``bench``) stay on the command line. Relative paths in the file are relative
to the working directory, as on the command line.

``allocate`` records the arguments it ran with as ``config.yaml`` (:func:`config_yaml`), so that
``senslora allocate --config OUT/config.yaml --out NEW`` repeats the run.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

from ..core.errors import SensloraError

CONFIG_COMMANDS = ("allocate", "train", "bench")
CONFIG_DEST = "config_file"
CONFIG_FILE = "config.yaml"  # what allocate records beside allocation.json
NOT_RECORDED = (CONFIG_DEST, "out", "overwrite")  # where a run writes, not what it computes


def add_config_flag(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--config",
        dest=CONFIG_DEST,
        default=None,
        metavar="FILE.yaml",
        help=f"YAML file of `senslora {command}` flag values (keys: the flags' names, with - or _); "
        "flags on the command line override it",
    )


def _norm(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def _keys(sub: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, bool]]:
    """Key -> (its flag, whether the key is the flag's name rather than the name it fills)."""
    keys: dict[str, tuple[argparse.Action, bool]] = {}
    for action in sub._actions:
        if not action.option_strings or action.dest in (argparse.SUPPRESS, "help", CONFIG_DEST):
            continue
        keys.setdefault(_norm(action.dest), (action, False))
        for flag in action.option_strings:
            keys[_norm(flag)] = (action, True)
    return keys


def read_config(path: str | Path) -> dict[str, Any]:
    """The mapping of a ``--config`` file; a missing file, bad YAML or another shape is one line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SensloraError(f"--config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SensloraError(f"cannot read --config {path} ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise SensloraError(f"--config {path} is not valid YAML ({where}{getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SensloraError(f"--config {path} must hold a mapping of flag names to values, found {type(data).__name__}")
    return data


def _unknown(path: Path, command: str, key: str, known: list[str]) -> SensloraError:
    close = difflib.get_close_matches(_norm(key), known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; see `senslora {command} --help`"
    return SensloraError(f"--config {path}: unknown key {key!r} for senslora {command}{hint}")


def _scalar(action: argparse.Action, flag: str, value: Any, where: str) -> str:
    """``value`` as the command-line text of ``flag``, checked by the flag's type and choices."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        kind = "true/false" if isinstance(value, bool) else type(value).__name__
        raise SensloraError(f"{where}: {flag} takes one value, found {kind} {value!r}")
    text = str(value)
    converted: Any = text
    if action.type is not None:
        try:
            converted = action.type(text)
        except argparse.ArgumentTypeError as exc:
            raise SensloraError(f"{where}: {flag}: {exc}") from None
        except (TypeError, ValueError):
            name = getattr(action.type, "__name__", repr(action.type))
            raise SensloraError(f"{where}: {flag}: invalid {name} value: {text!r}") from None
    if action.choices is not None and converted not in action.choices:
        shown = ", ".join(repr(c) for c in action.choices)
        raise SensloraError(f"{where}: {flag}: invalid choice: {text!r} (choose from {shown})")
    return text


def _tokens(action: argparse.Action, by_flag: bool, key: str, value: Any, path: Path) -> list[str]:
    """The command-line arguments that one key of the file stands for."""
    flag, where = action.option_strings[-1], f"--config {path}: {key}"
    if value is None:
        return []
    if action.nargs == 0:  # an on/off flag
        if not isinstance(value, bool):
            raise SensloraError(f"{where}: {flag} is on or off: write true or false, found {value!r}")
        on = value if by_flag else value == action.const
        return [flag] if on else []
    if isinstance(action, argparse._AppendAction):  # repeatable: a list, or KEY: VALUE pairs
        items = [f"{k}={json.dumps(v)}" for k, v in value.items()] if isinstance(value, dict) else value
        items = items if isinstance(items, list) else [items]
        return [token for item in items for token in (flag, _scalar(action, flag, item, where))]
    return [flag, _scalar(action, flag, value, where)]


def _config_path(argv: list[str]) -> str | None:
    """The value of the last ``--config`` in ``argv`` (``--config X`` or ``--config=X``)."""
    found = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith("--config="):
            found = token.partition("=")[2]
    return found


def expand_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the arguments of its ``--config`` file inserted after the subcommand (before
    the command line's own, which therefore win); unchanged without ``--config``."""
    if not argv or argv[0] not in CONFIG_COMMANDS:
        return argv
    path = _config_path(argv[1:])
    if path is None:
        return argv
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    keys = _keys(subparsers.choices[argv[0]])
    tokens: list[str] = []
    for key, value in read_config(path).items():
        if _norm(key) not in keys:
            raise _unknown(Path(path), argv[0], key, sorted(keys))
        action, by_flag = keys[_norm(key)]
        tokens += _tokens(action, by_flag, key, value, Path(path))
    return [argv[0], *tokens, *argv[1:]]


def recorded(args: argparse.Namespace) -> dict[str, Any]:
    """The flag values of a parsed command line (by the names they fill), less where the run
    writes (:data:`NOT_RECORDED`): what :func:`config_yaml` writes."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", *NOT_RECORDED)}


def config_yaml(values: dict[str, Any], command: str) -> str:
    """``values`` as a ``--config`` file, with a header saying how to repeat the run."""
    import yaml

    header = (
        f"# The flags this `senslora {command}` ran with (paths as given, relative to where it ran).\n"
        f"# Repeat it: senslora {command} --config {CONFIG_FILE} --out NEW_FOLDER\n"
    )
    return header + yaml.safe_dump(values, sort_keys=False, default_flow_style=False)
