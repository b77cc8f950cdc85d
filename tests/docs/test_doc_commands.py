"""Every command in README.md and docs/*.md runs as written, or says how to make its inputs.

Commands are read from shell code blocks and from inline code in the prose
(`` `npu-rft doctor` ``, `` `python tools/make_tiny.py` ``): a span whose first
word is ``npu-rft``, ``torchrun``, ``python``, ``make``, ``pip``, ``git`` or
``bash`` and that has arguments.

- Each ``npu-rft`` command (also behind ``torchrun ... -m npu_rft`` or
  ``--no-python npu-rft``) is checked against the CLI: the subcommand exists,
  every option is one it declares, ``--config`` files exist and load, and
  ``--set`` overrides apply. ``python tools/X.py`` names a script that declares
  every option used; ``make X`` a Makefile target.
- Per doc, in the order the doc gives them, in a scratch directory laid out
  like the repository (so ``../shared/data`` and ``configs/`` resolve as they
  do for a reader): a command runs when it needs no accelerator and its inputs
  are there (doctor, convert-data on the local DxBench copy, evaluate's
  baselines, ``tools/make_tiny.py``, a CPU config under torchrun, ...).
  Whether it runs or not, every file it reads (its input options and its
  config's ``model``/``data`` paths) must be in the repository, made by an
  earlier command of the same doc, or listed in ``READER_INPUTS`` together
  with the words by which the doc tells the reader where it comes from.
- Every repository path the docs name (``npu_rft/evaluate.py``,
  ``configs/tiny/``, a relative link) exists.

The quickstart and the full benchmarks are exercised by their own (smoke and
slow) tests.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import click
import pytest
from click.testing import CliRunner
from helpers import run_command

from npu_rft.cli import SUBCOMMANDS, cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
ENV_ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# First words of an inline code span that make it a command (when it has arguments).
COMMAND_WORDS = {"npu-rft", "torchrun", "python", "python3", "make", "pip", "git", "bash"}
# Subcommands that run on CPU in seconds when their inputs exist (and bench-kernels --quick);
# train and sft also run when their config's device is cpu.
RUNNABLE = {"doctor", "convert-data", "grade", "evaluate", "plot", "export"}
# Maintainer scripts the docs test runs (fast, writing only under the working directory),
# with what each one makes.
TOOL_OUTPUTS = {"tools/make_tiny.py": ("tiny-model", "data/tiny")}
# Options whose value is a file or directory the command reads.
INPUT_OPTIONS = ("--input", "--data", "--train", "--completions", "--model", "--adapter", "--config",
                 "--compare", "--run", "--checkpoint")
# Options whose value the command writes.
OUTPUT_OPTIONS = ("--out-dir", "--output", "--out", "--json")
# What the repository holds at its top level: a path in the docs starting with one of these is checked.
REPO_DIRS = ("configs", "docs", "kernels", "npu_rft", "tests", "tools", ".ci")
REPO_FILES = ("README.md", "Makefile", "setup.py", "pytest.ini")

# Inputs that the reader brings: (doc, input path pattern) -> a pattern the doc
# must match, the words by which it says where the input comes from.
READER_INPUTS: Dict[Tuple[str, str], str] = {
    # The public DxBench release, which npu-rft never downloads.
    ("README.md", r"DxBench_zh\.json"): r"`DxBench_zh\.json` is your copy of DxBench's public JSON files",
    ("data.md", r"\.\./shared/data/DxBench_zh\.json"): r"is a local copy of DxBench's public JSON release",
    ("dxbench.md", r"\.\./shared/data/DxBench_zh\.json"): r"Use a local copy of the\s+JSON files of its public release",
    # The reader's own data.
    ("data.md", r"qa\.jsonl"): r"`--format jsonl` reads any JSON array or JSONL of objects",
    ("graders.md", r"eval\.jsonl"): r"`eval\.jsonl` holds rows written by `npu-rft convert-data`",
    ("graders.md", r"preds\.jsonl"): r"`preds\.jsonl` holds\s+`\{\"id\": \.\.\., \"completion\"",
    # Base models: the hub name in the configs, or a local copy.
    ("README.md", r"/models/Qwen2\.5-7B-Instruct"): r"`/models/Qwen2\.5-7B-Instruct` a\s+local copy of the model",
    ("README.md", r"Qwen/Qwen2\.5-7B-Instruct"): r"the hub name\s+`Qwen/Qwen2\.5-7B-Instruct`, is downloaded",
    ("dxbench.md", r"Qwen/Qwen2\.5-7B-Instruct"): r"Set `model\.name_or_path` to a local copy of\s+the model",
    # The DxBench configs' data, made as dxbench.md says, and their model.
    **{(doc, path): r"`data/dxbench/train\.jsonl` and `eval\.jsonl`, made by the\s+conversion in\s+\[dxbench\.md\]"
       for doc in ("algorithms.md", "ascend.md", "distributed.md") for path in (r"data/dxbench/",)},
    **{(doc, r"Qwen/Qwen2\.5-7B-Instruct"): r"the model (that )?its\s+`model\.name_or_path`\s+names"
       for doc in ("algorithms.md", "ascend.md", "distributed.md")},
}


@dataclass(frozen=True)
class Command:
    doc: str
    line_no: int
    line: str
    inline: bool

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line_no}"

    @property
    def words(self) -> Optional[List[str]]:
        """The command's words, leading ``VAR=value`` assignments dropped."""
        try:
            words = shlex.split(self.line)
        except ValueError:
            return None
        while len(words) > 1 and ENV_ASSIGNMENT.fullmatch(words[0]):
            words = words[1:]
        return words

    @property
    def npu_rft_args(self) -> Optional[List[str]]:
        """The arguments after ``npu-rft`` / ``-m npu_rft``, else None."""
        words = self.words or []
        for i, word in enumerate(words):
            if word == "npu-rft" or (word == "npu_rft" and i > 0 and words[i - 1] == "-m"):
                return words[i + 1:]
        return None

    @property
    def kind(self) -> str:
        words = self.words or [""]
        if self.npu_rft_args is not None:
            return "npu-rft"
        if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
            return "tool"
        if words[0] == "make":
            return "make"
        return "external"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def doc_commands(doc: Path) -> List[Command]:
    """The doc's commands in the order they appear: shell blocks (continuations
    joined, comments dropped) and inline code spans that are commands."""
    text = doc.read_text(encoding="utf-8")
    found = []
    for fence in FENCE.finditer(text):
        if fence.group(1) not in SHELL_LANGS:
            continue
        first = _line_of(text, fence.start(2))
        logical, start = "", None
        for n, raw in enumerate(fence.group(2).splitlines(), start=first):
            start = n if start is None else start
            if raw.endswith("\\"):
                logical += raw[:-1] + " "
                continue
            line = (logical + raw).split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                found.append(Command(doc.name, start, line, inline=False))
            logical, start = "", None
    # Inline code, outside the fenced blocks (blanked out, keeping the line numbers).
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(prose):
        try:
            words = shlex.split(span.group(1))
        except ValueError:
            continue
        while words and ENV_ASSIGNMENT.fullmatch(words[0]):  # VAR=value before the command
            words = words[1:]
        if len(words) >= 2 and words[0] in COMMAND_WORDS:
            found.append(Command(doc.name, _line_of(prose, span.start()), span.group(1), inline=True))
    return sorted(found, key=lambda c: c.line_no)


COMMANDS = {doc.name: doc_commands(doc) for doc in DOCS}
ALL = [c for commands in COMMANDS.values() for c in commands]
NPU_RFT = [c for c in ALL if c.kind == "npu-rft"]
TOOLS_AND_MAKE = [c for c in ALL if c.kind in ("tool", "make")]


def option_names(command: click.Command) -> set:
    names = set()
    for param in command.params:
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names | {"--help", "-h"}


def is_placeholder(value: str) -> bool:
    """``...``, ``<your file>``: the doc shows the shape of a command, not a file."""
    return value.strip(".") == "" or "<" in value


def test_the_docs_hold_commands():
    assert len(NPU_RFT) >= 10, NPU_RFT
    assert {c.npu_rft_args[0] for c in NPU_RFT if c.npu_rft_args} >= {"convert-data", "train", "evaluate", "doctor"}
    inline = [c for c in ALL if c.inline]
    assert len(inline) >= 10, inline  # inline code is read too
    assert any("configs/tiny/dpo_lora_cpu.yaml" in c.line for c in ALL)


def test_inline_code_is_read_with_its_line(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "Intro.\n\n```bash\nnpu-rft doctor \\\n  --json   # a comment\n```\n\n"
        "Then `npu-rft evaluate --data e.jsonl` or `FOO=1 make test`; not `npu_rft/evaluate.py` nor `torchrun`.\n",
        encoding="utf-8")
    commands = doc_commands(doc)
    assert [(c.line_no, c.line, c.inline) for c in commands] == [
        (4, "npu-rft doctor    --json", False),
        (8, "npu-rft evaluate --data e.jsonl", True),
        (8, "FOO=1 make test", True),
    ]
    assert [c.kind for c in commands] == ["npu-rft", "npu-rft", "make"] and commands[2].words == ["make", "test"]


@pytest.mark.parametrize("cmd", NPU_RFT, ids=[c.where for c in NPU_RFT])
def test_doc_command_matches_the_cli(cmd):
    args = cmd.npu_rft_args
    assert args and args[0] in SUBCOMMANDS, f"{cmd.where}: `{cmd.line}`: unknown subcommand; known: {sorted(SUBCOMMANDS)}"
    command = cli.get_command(click.Context(cli), args[0])
    known = option_names(command)
    used = [a.split("=", 1)[0] for a in args[1:] if a.startswith("-") and not re.fullmatch(r"-\d.*", a)]
    unknown = [a for a in used if a not in known]
    assert not unknown, f"{cmd.where}: `{cmd.line}`: {args[0]} has no option {unknown}; it has {sorted(known)}"
    if "--config" in args and not is_placeholder(args[args.index("--config") + 1]):
        _load_config(cmd, args)


def _load_config(cmd: Command, args: List[str]):
    from npu_rft.config import load_train_config

    config = args[args.index("--config") + 1]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set" and not is_placeholder(args[i + 1])]
    assert (ROOT / config).is_file(), f"{cmd.where}: `{cmd.line}`: no config file {config}"
    return load_train_config(ROOT / config, overrides)


def _declared_options(script: Path) -> Set[str]:
    return set(re.findall(r"""add_argument\(\s*["'](--?[\w-]+)["']""", script.read_text(encoding="utf-8")))


@pytest.mark.parametrize("cmd", TOOLS_AND_MAKE, ids=[c.where for c in TOOLS_AND_MAKE])
def test_doc_tool_and_make_commands_exist(cmd):
    words = cmd.words
    if cmd.kind == "make":
        targets = set(re.findall(r"^([\w.-]+)\s*:", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
        missing = [w for w in words[1:] if not w.startswith("-") and "=" not in w and w not in targets]
        assert not missing, f"{cmd.where}: `{cmd.line}`: no Makefile target {missing}; targets: {sorted(targets)}"
        return
    script = ROOT / words[1]
    assert script.is_file(), f"{cmd.where}: `{cmd.line}`: no script {words[1]}"
    declared = _declared_options(script) | {"--help", "-h"}
    used = [w.split("=", 1)[0] for w in words[2:] if w.startswith("-") and not re.fullmatch(r"-\d.*", w)]
    unknown = [w for w in used if w not in declared]
    assert not unknown, f"{cmd.where}: `{cmd.line}`: {words[1]} has no option {unknown}; it has {sorted(declared)}"


# ---------------------------------------------------------------- inputs, outputs, runs


def _option_values(args: List[str], names) -> List[str]:
    out = []
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if flag in names:
            if eq:
                out.append(value)
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                out.append(args[i + 1])
    return out


def _config(cmd: Command):
    args = cmd.npu_rft_args
    if "--config" not in args or is_placeholder(args[args.index("--config") + 1]):
        return None
    return _load_config(cmd, args)


def inputs_of(cmd: Command) -> List[str]:
    """The files and directories a command reads (placeholders left out)."""
    if cmd.kind != "npu-rft":
        return []
    args = cmd.npu_rft_args
    found = _option_values(args, INPUT_OPTIONS)
    if args and args[0] == "plot":
        found += [a for a in args[1:2] if not a.startswith("-")]  # RUN_DIR
    config = _config(cmd)
    if config is not None:
        sft = getattr(config, "sft", None)
        found += [config.model.name_or_path, config.model.init_adapter, config.data.train, config.data.eval,
                  getattr(sft, "text_data", None)]
    return [p for p in found if p and not is_placeholder(p)]


def outputs_of(cmd: Command) -> List[str]:
    """What a command writes, whether or not the test runs it."""
    if cmd.kind == "tool":
        return list(TOOL_OUTPUTS.get(cmd.words[1], ()))
    if cmd.kind != "npu-rft":
        return []
    args = cmd.npu_rft_args
    found = _option_values(args, OUTPUT_OPTIONS)
    if args and args[0] == "quickstart" and "--out" not in args:
        found.append("runs/quickstart")
    config = _config(cmd)
    if config is not None and args[0] in ("train", "sft"):
        found.append(config.run.output_dir)
    return found


def _is_made(path: str, made: List[str]) -> bool:
    norm = os.path.normpath(path)
    return any(norm == os.path.normpath(m) or norm.startswith(os.path.normpath(m) + os.sep) for m in made)


def _in_repository(path: str) -> bool:
    first = Path(path).parts[0] if Path(path).parts else ""
    return (first in REPO_DIRS or path in REPO_FILES) and (ROOT / path).exists()


def _reader_pattern(doc: str, path: str) -> Optional[Tuple[str, str]]:
    """The ``READER_INPUTS`` key that lists ``path`` for ``doc`` (a pattern
    ending in ``/`` covers everything under it), else None."""
    for name, pattern in READER_INPUTS:
        if name == doc and (re.fullmatch(pattern, path) or pattern.endswith("/") and re.match(pattern, path)):
            return name, pattern
    return None


def unaccounted_inputs(doc: str, commands: List[Command], text: str) -> List[str]:
    """Inputs of the doc's commands that are neither in the repository, nor made
    by an earlier command of the doc, nor a reader input that the doc's
    ``text`` explains."""
    made: List[str] = []
    problems = []
    for cmd in commands:
        for path in inputs_of(cmd):
            if _in_repository(path) or _is_made(path, made):
                continue
            key = _reader_pattern(doc, path)
            if key is None:
                problems.append(f"{cmd.where}: `{cmd.line}` reads {path}, which no earlier command of {doc} makes; "
                                "add the command that makes it, or say where it comes from (READER_INPUTS)")
            elif not re.search(READER_INPUTS[key], text):
                problems.append(f"{cmd.where}: `{cmd.line}` reads {path}, and {doc} no longer says where it comes "
                                f"from (READER_INPUTS expects /{READER_INPUTS[key]}/); say it, or update READER_INPUTS")
        made += outputs_of(cmd)
    return problems


def _doc_path(name: str) -> Path:
    return ROOT / name if name == "README.md" else ROOT / "docs" / name


@pytest.mark.parametrize("doc", sorted(COMMANDS))
def test_every_input_of_a_doc_command_is_made_or_explained(doc):
    problems = unaccounted_inputs(doc, COMMANDS[doc], _doc_path(doc).read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


def test_reader_inputs_are_all_used():
    used = {_reader_pattern(doc, path) for doc, commands in COMMANDS.items() for cmd in commands for path in inputs_of(cmd)}
    stale = sorted(set(READER_INPUTS) - used)
    assert not stale, f"READER_INPUTS entries no doc command reads: {stale}"


def test_a_bare_subcommand_in_a_sentence_is_a_name():
    assert names_a_subcommand(Command("x.md", 1, "npu-rft convert-data", inline=True))
    assert not names_a_subcommand(Command("x.md", 1, "npu-rft doctor", inline=True))  # runs as written
    assert not names_a_subcommand(Command("x.md", 1, "npu-rft convert-data", inline=False))


def test_an_unmade_input_is_reported():
    evaluate = Command("x.md", 3, "npu-rft evaluate --data data/mine/eval.jsonl", inline=True)
    assert unaccounted_inputs("x.md", [evaluate], "") == [
        "x.md:3: `npu-rft evaluate --data data/mine/eval.jsonl` reads data/mine/eval.jsonl, which no earlier "
        "command of x.md makes; add the command that makes it, or say where it comes from (READER_INPUTS)"]
    convert = Command("x.md", 1, "npu-rft convert-data --input tests/fixtures/dxbench_sample.json "
                                 "--out-dir data/mine --train-size 3", inline=False)
    assert unaccounted_inputs("x.md", [convert, evaluate], "") == []
    assert len(unaccounted_inputs("x.md", [evaluate, convert], "")) == 1  # made too late
    tiny = Command("x.md", 5, "torchrun --nproc-per-node 2 -m npu_rft train --config configs/tiny/dpo_lora_cpu.yaml",
                   inline=True)
    assert [p.split(" reads ")[1].split(",")[0] for p in unaccounted_inputs("x.md", [tiny], "")] == [
        "tiny-model", "data/tiny/train.jsonl"]
    tool = Command("x.md", 4, "python tools/make_tiny.py", inline=False)
    assert unaccounted_inputs("x.md", [tool, tiny], "") == []


def _scratch_repo(tmp_path: Path) -> Path:
    """``tmp/repo`` with the repository's configs, tests and tools, and
    ``tmp/shared`` pointing at the real ``../shared`` when it exists."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("configs", "tests", "tools"):
        (repo / name).symlink_to(ROOT / name)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (tmp_path / "shared").symlink_to(shared)
    return repo


def names_a_subcommand(cmd: Command) -> bool:
    """Inline `npu-rft convert-data` in a sentence names the subcommand: the
    bare subcommand of a command that has required options is not a run."""
    args = cmd.npu_rft_args
    if not cmd.inline or args is None or len(args) != 1 or args[0] not in SUBCOMMANDS:
        return False
    command = cli.get_command(click.Context(cli), args[0])
    return any(param.required for param in command.params)


def _runnable(cmd: Command, cwd: Path) -> bool:
    if cmd.kind == "tool":
        return cmd.words[1] in TOOL_OUTPUTS
    if cmd.kind != "npu-rft" or is_placeholder(cmd.line) or "..." in cmd.words or names_a_subcommand(cmd):
        return False
    args = cmd.npu_rft_args
    if not args:
        return False
    if args[0] in ("train", "sft"):
        config = _config(cmd)
        ok = config is not None and config.run.device == "cpu"
    elif args[0] == "doctor" and "--full" in args:
        ok = False  # the acceptance suite takes a minute or more; tests/npu_rft/test_acceptance.py runs it
    else:
        ok = args[0] in RUNNABLE or (args[0] == "bench-kernels" and "--quick" in args)
    return ok and all((cwd / p).exists() for p in inputs_of(cmd))


def _run(cmd: Command, cwd: Path) -> None:
    words = cmd.words
    if cmd.kind == "tool":
        argv = [sys.executable, str(cwd / words[1]), *words[2:]]
    elif words[0] == "torchrun":
        argv = [str(Path(sys.executable).parent / "torchrun"), *words[1:]]
    else:
        result = CliRunner().invoke(cli, cmd.npu_rft_args, catch_exceptions=False)
        assert result.exit_code == 0, f"{cmd.where}: `{cmd.line}` exited {result.exit_code}:\n{result.output}"
        return
    env = dict(os.environ)
    if words[0] == "torchrun":  # torchrun reads PET_<OPTION>: a free port, not 29500 shared with other runs
        env.setdefault("PET_MASTER_PORT", str(_free_port()))
    proc = run_command(argv, cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, f"{cmd.where}: `{cmd.line}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    for path in TOOL_OUTPUTS.get(words[1] if cmd.kind == "tool" else "", ()):
        assert (cwd / path).exists(), f"{cmd.where}: `{cmd.line}` did not make {path} (TOOL_OUTPUTS says it does)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("doc", sorted(d for d, commands in COMMANDS.items() if commands))
def test_runnable_doc_commands_run(doc, tmp_path, monkeypatch):
    repo = _scratch_repo(tmp_path)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("NPU_RFT_DEVICE", "cpu")
    ran = []
    for cmd in COMMANDS[doc]:
        if cmd.line not in ran and _runnable(cmd, repo):  # a command the doc repeats runs once
            _run(cmd, repo)
            ran.append(cmd.line)
    if not ran:
        pytest.skip(f"{doc}: no command runnable here (they need an accelerator, a model or user files)")


# ---------------------------------------------------------------- repository paths

PATH_TOKEN = re.compile(
    r"(?<![\w./~$-])((?:" + "|".join(re.escape(d) for d in REPO_DIRS) + r")/[\w./*{},-]*|"
    + "|".join(re.escape(f) for f in REPO_FILES) + r")(?![\w-])"
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _expand_braces(path: str) -> List[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for part in m.group(1).split(",") for p in _expand_braces(path[:m.start()] + part + path[m.end():])]


def named_paths(doc: Path) -> List[Tuple[int, str, Path]]:
    """(line, as written, resolved path) of every repository path the doc names:
    in code (inline or fenced) and as relative link targets."""
    text = doc.read_text(encoding="utf-8")
    found = []
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # same line numbers as text
    code = [(_line_of(text, m.start(2)), m.group(2)) for m in FENCE.finditer(text)]
    code += [(_line_of(prose, m.start(1)), m.group(1)) for m in INLINE.finditer(prose)]
    for first_line, chunk in code:
        for m in PATH_TOKEN.finditer(chunk):
            written = m.group(1).rstrip(".,")
            for path in _expand_braces(written):
                found.append((first_line + chunk.count("\n", 0, m.start(1)), written, ROOT / path))
    for m in LINK.finditer(prose):
        target = m.group(1).split("#", 1)[0]
        if target and not re.match(r"[a-z]+:", target):
            found.append((_line_of(prose, m.start()), target, (doc.parent / target).resolve()))
    return found


def _exists(path: Path) -> bool:
    return bool(glob.glob(str(path))) if any(c in str(path) for c in "*?[") else path.exists()


def test_every_repository_path_the_docs_name_exists():
    named = [(doc, line, written, path) for doc in DOCS for line, written, path in named_paths(doc)]
    assert len(named) >= 100, named  # the docs name well over a hundred: the scan still finds them
    missing = [f"{doc.relative_to(ROOT)}:{line}: {written}" for doc, line, written, path in named if not _exists(path)]
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_path_scan_sees_code_and_links(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("See `npu_rft/{evaluate,nothere}.py:12`, [c](configs/tiny/) and ../shared/x.\n\n"
                   "```yaml\nname_or_path: tiny-model  # kernels/npu_rft_kernels/logprob/*.py\n```\n", encoding="utf-8")
    found = {(line, str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)) for line, _, path in named_paths(doc)}
    assert found == {(1, "npu_rft/evaluate.py"), (1, "npu_rft/nothere.py"), (1, str(tmp_path / "configs/tiny")),
                     (4, "kernels/npu_rft_kernels/logprob/*.py")}
    assert [_exists(p) for _, _, p in sorted(named_paths(doc), key=lambda t: str(t[2]))].count(False) == 2


def test_dotted_npu_rft_names_resolve():
    """``npu_rft.evaluate.baselines``-style names in the docs are modules or their attributes."""
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"(?<![\w./])(npu_rft(?:_kernels)?(?:\.\w+)+)", text):
            name = m.group(1)
            if not _resolves(name):
                missing.append(f"{doc.relative_to(ROOT)}:{_line_of(text, m.start())}: {name}")
    assert not missing, "dotted names in the docs that do not resolve:\n" + "\n".join(missing)


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            obj = importlib.import_module(module)
            for attr in parts[cut:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False
