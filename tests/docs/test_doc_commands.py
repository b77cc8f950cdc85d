"""Every command in README.md and docs/ must run as written.

Each ``npu-rft`` command in a fenced code block (also behind ``torchrun ...
-m npu_rft`` or ``--no-python npu-rft``) is checked against the CLI itself:
the subcommand exists, every option is one it declares, ``--config`` files
exist and load, and ``--set`` overrides apply to them. Commands that need no
accelerator and whose inputs exist here (doctor, convert-data on the local
DxBench copy, evaluate's baselines, ...) are then run, in the order a doc
gives them, in a scratch directory laid out like the repository (so
``../shared/data`` and ``configs/`` resolve as they do for a reader). The
quickstart and the full benchmarks are exercised by their own (smoke and
slow) tests.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import List, Optional, Tuple

import click
import pytest
from click.testing import CliRunner

from npu_rft.cli import SUBCOMMANDS, cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# Subcommands that run on CPU in seconds when their inputs exist (and bench-kernels --quick).
RUNNABLE = {"doctor", "convert-data", "grade", "evaluate", "plot", "export"}


def shell_lines(text: str) -> List[str]:
    """Command lines of the shell code blocks: continuations joined, comments dropped."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang not in SHELL_LANGS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def npu_rft_args(line: str) -> Optional[List[str]]:
    """The arguments after ``npu-rft`` / ``-m npu_rft`` in a command line, else None."""
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word == "npu-rft" or (word == "npu_rft" and i > 0 and words[i - 1] == "-m"):
            return words[i + 1:]
    return None


def doc_commands() -> List[Tuple[str, str, List[str]]]:
    found = []
    for doc in DOCS:
        for line in shell_lines(doc.read_text(encoding="utf-8")):
            args = npu_rft_args(line)
            if args is not None:
                found.append((doc.name, line, args))
    return found


COMMANDS = doc_commands()


def option_names(command: click.Command) -> set:
    names = set()
    for param in command.params:
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names | {"--help", "-h"}


def test_the_docs_hold_commands():
    assert len(COMMANDS) >= 10, COMMANDS
    assert {args[0] for _, _, args in COMMANDS} >= {"convert-data", "train", "evaluate", "doctor"}


@pytest.mark.parametrize("doc,line,args", COMMANDS, ids=[f"{d}:{a[0] if a else ''}" for d, _, a in COMMANDS])
def test_doc_command_matches_the_cli(doc, line, args):
    assert args and args[0] in SUBCOMMANDS, f"{doc}: `{line}`: unknown subcommand; known: {sorted(SUBCOMMANDS)}"
    command = cli.get_command(click.Context(cli), args[0])
    known = option_names(command)
    used = [a.split("=", 1)[0] for a in args[1:] if a.startswith("-") and not re.fullmatch(r"-\d.*", a)]
    unknown = [a for a in used if a not in known]
    assert not unknown, f"{doc}: `{line}`: {args[0]} has no option {unknown}; it has {sorted(known)}"
    if "--config" in args:
        from npu_rft.config import load_train_config

        config = args[args.index("--config") + 1]
        overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        assert (ROOT / config).is_file(), f"{doc}: `{line}`: no config file {config}"
        load_train_config(ROOT / config, [o for o in overrides if "<" not in o])


def _inputs_exist(args: List[str], cwd: Path) -> bool:
    """Whether every path-like argument that must exist is there."""
    for flag in ("--input", "--data", "--train", "--completions", "--model", "--adapter", "--config", "--compare"):
        for i, a in enumerate(args[:-1]):
            if a == flag and not (cwd / args[i + 1]).exists():
                return False
    return "<" not in " ".join(args)


def _scratch_repo(tmp_path: Path) -> Path:
    """``tmp/repo`` with the repository's configs and fixtures, and ``tmp/shared``
    pointing at the real ``../shared`` when it exists."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("configs", "tests"):
        (repo / name).symlink_to(ROOT / name)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (tmp_path / "shared").symlink_to(shared)
    return repo


@pytest.mark.parametrize("doc", sorted({d for d, _, _ in COMMANDS}))
def test_runnable_doc_commands_run(doc, tmp_path, monkeypatch):
    repo = _scratch_repo(tmp_path)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("NPU_RFT_DEVICE", "cpu")
    ran = []
    for name, line, args in COMMANDS:
        quick_bench = args[0] == "bench-kernels" and "--quick" in args
        if name != doc or not (args[0] in RUNNABLE or quick_bench) or not _inputs_exist(args, repo):
            continue
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, f"{doc}: `{line}` exited {result.exit_code}:\n{result.output}"
        ran.append(line)
    if not ran:
        pytest.skip(f"{doc}: no command runnable here (they need an accelerator, a model or user files)")
