"""docs/configs.md, generated from the config dataclasses.

Every key of ``TrainConfig`` (and each algorithm's section) is listed with its
type, default and the comment written beside its field in the source, so the
reference cannot drift from the code: ``tests/npu_rft/test_config_doc.py``
regenerates it and compares. Regenerate with ``python tools/gen_config_doc.py``.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any, Dict, List, Tuple

HEADER = """# Config reference

Generated from the config dataclasses by `python tools/gen_config_doc.py`; a test
fails when this file and the code disagree. A training config is a YAML file of
these sections; any key can be overridden on the command line with
`--set section.key=value` (for example `--set optim.lr=1e-5 --set model.lora.r=16`).
Unknown keys are errors that list the valid ones, and every problem in a file is
reported together. Only the section of the selected `algorithm` may be set.
"""

_FIELD_LINE = re.compile(r"^\s*(\w+)\s*:\s*[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")


def field_comments(cls: type) -> Dict[str, str]:
    """The ``# comment`` beside (or in the comment lines just above) each field."""
    comments: Dict[str, str] = {}
    above: List[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD_LINE.match(line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            text = " ".join(above + ([match.group(2).strip()] if match.group(2) else []))
            comments[match.group(1)] = text
        above = []
    return comments


def _type_text(tp: Any) -> str:
    """A YAML-minded name for an annotation: ``int``, ``a | b``, ``list of str``, ``... or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (list, List):
        return f"list of {_type_text(args[0])}" if args else "list"
    if origin in (dict, Dict):
        return "mapping"
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_text(a) for a in rest) + " or null"
    if origin is not None:
        return " or ".join(_type_text(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    return str(value)


def _rows(cls: type, prefix: str) -> Tuple[List[str], List[Tuple[str, type]]]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows, sections = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = tp
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (list, List) and args and dataclasses.is_dataclass(args[0]):
            sections.append((f"{prefix}{f.name}[]", args[0]))
            rows.append(f"| `{prefix}{f.name}` | list of {args[0].__name__} | {_default_text(f)} | see below |")
            continue
        if dataclasses.is_dataclass(inner):
            sections.append((f"{prefix}{f.name}", inner))
            continue
        rows.append(f"| `{prefix}{f.name}` | {_cell(_type_text(tp))} | {_cell(_default_text(f))} | {_cell(comments.get(f.name, ''))} |")
    return rows, sections


def render() -> str:
    from npu_rft.config import TrainConfig

    out = [HEADER]
    top_rows, sections = _rows(TrainConfig, "")
    if top_rows:
        out += ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|", *top_rows, ""]
    while sections:
        name, cls = sections.pop(0)
        rows, nested = _rows(cls, f"{name}.")
        doc = inspect.getdoc(cls) or ""
        first = doc.split("\n\n")[0].replace("\n", " ") if doc and not doc.startswith(cls.__name__ + "(") else ""
        out += [f"## `{name}` ({cls.__name__})", ""]
        if first:
            out += [first, ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
        sections = nested + sections
    return "\n".join(out).rstrip() + "\n"
