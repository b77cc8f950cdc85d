"""The training-row format: ``{"system", "context", "target", "meta"}`` JSONL.

One row per line, UTF-8. ``context`` is the user turn, ``target`` the reference
answer, ``system`` the optional system prompt. ``meta`` is an optional object;
the keys this project reads are ``id`` (unique in the file), ``candidates`` (the
answer options in the order the prompt lists them), ``department`` and
``source``. Supervised fine-tuning also accepts plain-text rows ``{"text": ...}``
(``read_examples(..., allow_text=True)``).

Every row is validated; problems are reported as ``path:line: what; fix``.
"""
from __future__ import annotations

import json
import os
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

# How many problems an error message lists before it gives a count of the rest.
MAX_SHOWN_PROBLEMS = 10

CHAT_FIELDS = ("system", "context", "target", "meta")
TEXT_FIELDS = ("text", "meta")


class DataError(ValueError):
    """Bad data: each problem reads ``path:line: what is wrong; how to fix it``.

    ``problems`` holds every problem found; the message shows the first
    ``MAX_SHOWN_PROBLEMS`` and a count of the rest.
    """

    def __init__(self, problems: Union[str, Sequence[str]]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:MAX_SHOWN_PROBLEMS]
        rest = len(self.problems) - len(shown)
        lines = shown if len(self.problems) == 1 else [f"{len(self.problems)} problems:"] + shown
        if rest:
            lines.append(f"... and {rest} more problem(s)")
        super().__init__("\n".join(lines))


def normalize(text: str) -> str:
    """The answer normalisation shared by data checks and graders: NFKC, strip, casefold.

    NFKC folds full-width forms (``ＡＢＣ`` -> ``ABC``, ``，`` -> ``,``); casefold is
    a stronger lower-casing (``Straße`` -> ``strasse``).
    """
    return unicodedata.normalize("NFKC", text).strip().casefold()


@dataclass(frozen=True)
class Example:
    """One validated row. ``meta`` must survive ``json.dumps`` (it is written back out)."""

    context: str
    target: str
    system: Optional[str] = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    text: Optional[str] = None
    location: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.meta, Mapping):
            raise ValueError(f"meta must be a mapping, got {type(self.meta).__name__}; pass a dict")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"meta must be JSON-serialisable ({exc}); keep to str, int, float, bool, None, lists and dicts"
            ) from None

    @property
    def id(self) -> str:
        """``meta["id"]`` as a string, else the row's ``path:line``."""
        return str(self.meta["id"]) if "id" in self.meta else self.location

    def to_row(self) -> Dict[str, Any]:
        """The JSON object this example is written as (``meta`` left out when empty)."""
        if self.text is not None:
            row: Dict[str, Any] = {"text": self.text}
        else:
            row = {"system": self.system, "context": self.context, "target": self.target}
            if self.system is None:
                del row["system"]
        if self.meta:
            row["meta"] = dict(self.meta)
        return row


def row_problem(row: Any, *, allow_text: bool = False) -> Optional[str]:
    """Why ``row`` (a parsed JSON value) is not a valid row, or None when it is.

    Checks the keys and their types, that ``context`` and ``target`` are not
    empty, and that ``meta.candidates``, when present, is a non-empty list of
    strings that contains the target (after ``normalize``).
    """
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "text" in row:
        if not allow_text:
            return "plain-text rows ({\"text\": ...}) are accepted for SFT only; write system/context/target rows"
        valid: Tuple[str, ...] = TEXT_FIELDS
        required: Tuple[str, ...] = ("text",)
    else:
        valid, required = CHAT_FIELDS, ("context", "target")
    unknown = sorted(k for k in row if k not in valid)
    if unknown:
        return f"unknown field(s) {', '.join(map(repr, unknown))}; valid fields: {', '.join(valid)}"
    for key in required:
        if key not in row:
            return f"missing field {key!r}; every row needs {' and '.join(required)}"
        if not isinstance(row[key], str):
            return f"field {key!r} must be a string, got {type(row[key]).__name__}"
        if not row[key].strip():
            return f"field {key!r} is empty"
    if row.get("system") is not None and not isinstance(row["system"], str):
        return f"field 'system' must be a string or null, got {type(row['system']).__name__}"
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        return f"field 'meta' must be an object, got {type(meta).__name__}"
    if "id" in meta and (isinstance(meta["id"], bool) or not isinstance(meta["id"], (str, int))):
        return f"meta.id must be a string or an integer, got {meta['id']!r}"
    if "candidates" in meta:
        cands = meta["candidates"]
        if not isinstance(cands, list) or not cands or not all(isinstance(c, str) and c.strip() for c in cands):
            return "meta.candidates must be a non-empty list of non-empty strings"
        if "target" in row and normalize(row["target"]) not in {normalize(c) for c in cands}:
            return f"target {row['target']!r} is not among meta.candidates {cands}"
    return None


def iter_jsonl(path: Union[str, Path]) -> Iterator[Tuple[int, Any, Optional[str]]]:
    """Stream a JSONL file: ``(line_number, value, problem)`` per non-blank line.

    ``problem`` is None when the line decodes; otherwise ``value`` is the raw
    line text (undecodable bytes written as ``\\xNN``) and ``problem`` says why.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                text = raw.decode("utf-8", "backslashreplace").rstrip("\n")
                yield number, text, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8"
                continue
            line = line.rstrip("\r\n")
            if number == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield number, line, f"invalid JSON ({exc.msg} at column {exc.colno}); write one JSON object per line"


def read_examples(path: Union[str, Path], *, allow_text: bool = False) -> List[Example]:
    """Read and validate a JSONL file of rows; raise ``DataError`` listing every bad row.

    Besides ``row_problem``'s checks, ``meta.id`` must be unique in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass a JSONL file written by `npu-rft convert-data`")
    examples: List[Example] = []
    problems: List[str] = []
    first_seen: Dict[str, str] = {}
    for number, row, problem in iter_jsonl(path):
        location = f"{path}:{number}"
        problem = problem or row_problem(row, allow_text=allow_text)
        if problem is None and "id" in row.get("meta", {}):
            key = str(row["meta"]["id"])
            if key in first_seen:
                problem = f"duplicate meta.id {key!r} (first at {first_seen[key]}); ids must be unique"
            first_seen.setdefault(key, location)
        if problem is not None:
            problems.append(f"{location}: {problem}")
            continue
        examples.append(
            Example(
                context=row.get("context", ""),
                target=row.get("target", ""),
                system=row.get("system"),
                meta=row.get("meta", {}),
                text=row.get("text"),
                location=location,
            )
        )
    if problems:
        raise DataError(problems)
    if not examples:
        raise DataError(f"{path}: no rows; the file is empty")
    return examples


def read_completions(path: Union[str, Path], examples: Sequence[Example]) -> List[Tuple[Example, str]]:
    """Pair each line ``{"completion": str, "id"?: str|int}`` of a JSONL file with its example.

    With ``id`` on every line, lines match examples by ``Example.id`` (several
    completions per example are fine). Without ``id`` on any line, line i goes
    with example i and the counts must be equal. Problems raise ``DataError``.
    """
    path = Path(path)
    by_id = {ex.id: ex for ex in examples}
    pairs: List[Tuple[Example, str]] = []
    problems: List[str] = []
    n_lines = n_with_id = 0
    for number, row, problem in iter_jsonl(path):
        n_lines += 1
        if problem is None and not (isinstance(row, dict) and isinstance(row.get("completion"), str)):
            problem = 'expected {"completion": "...", "id": ...} with a string completion'
        elif problem is None and "id" in row:
            n_with_id += 1
            if str(row["id"]) not in by_id:
                problem = f"id {row['id']!r} is not in the data file"
        if problem is not None:
            problems.append(f"{path}:{number}: {problem}")
        elif "id" in row:
            pairs.append((by_id[str(row["id"])], row["completion"]))
        elif n_lines <= len(examples):
            pairs.append((examples[n_lines - 1], row["completion"]))
    if 0 < n_with_id < n_lines:
        problems.append(f"{path}: some lines have an id and some do not; give every line an id, or none")
    elif n_with_id == 0 and n_lines != len(examples):
        problems.append(f"{path}: {n_lines} completions for {len(examples)} data rows; without ids the counts must match")
    if problems:
        raise DataError(problems)
    return pairs


def write_jsonl_atomic(path: Union[str, Path], rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` as UTF-8 JSONL (non-ASCII kept as is); return the row count.

    The rows go to a temporary file in the same directory, which is renamed
    over ``path`` only when every row is written, so a failure leaves no
    partial file behind (and an existing ``path`` untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False))
                f.write("\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return count

