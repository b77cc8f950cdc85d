"""Raw data -> ``{system, context, target, meta}`` training rows (``npu-rft convert-data``).

A converter (registry ``CONVERTERS``) pairs a reader, which yields the raw
records of an input with their ``path:line``, and an extractor, which turns
one record into a ``Case`` or raises ``RowError``. Everything else is shared:

1. Candidates are de-duplicated after ``normalize`` (NFKC, strip, casefold),
   keeping the first spelling; the target must be among them.
2. With ``shuffle_candidates`` they are shuffled by ``random.Random(f"{seed}:{id}")``,
   so a case's order depends only on the seed and its id.
3. The context is the template filled in (``{candidates}`` is the final list,
   written as a Python list literal like the published prompt), or for the
   generic formats without a template, the mapped context field itself.
4. ``meta`` gets ``id``, ``candidates`` (prompt order), ``department`` (left
   out when the input has none) and ``source`` (the input's file name);
   ``meta=False`` writes strict ``system/context/target`` rows.
5. With ``train_size`` (a count N, or a fraction of the valid rows) the rows
   are split by ``random.Random(seed)``: a shuffled index list, whose first N
   entries go to ``train.jsonl``, the rest to ``eval.jsonl``. Each file keeps
   the input order.

Any bad row fails the conversion (``DataError`` listing ``path:line: reason``)
and nothing is written; with ``skip_invalid`` the good rows are written and each
rejected record goes to ``rejects.jsonl`` as ``{"location", "reason", "row"}``.
Inputs are streamed: JSONL line by line; a JSON array is read as text once and
decoded one element at a time (a JSON syntax error in an array stops the read,
since the elements after it cannot be found reliably). Converted rows are
staged in a temporary file, then written atomically (temporary file, rename).
"""
from __future__ import annotations

import json
import math
import random
import re
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from tqdm import tqdm

from npu_rft.data.schema import DataError, iter_jsonl, normalize, write_jsonl_atomic
from npu_rft.data.templates import DEFAULT_SYSTEM, LANGUAGES, Template, TemplateError, builtin_template, load_template
from npu_rft.registry import Registry

# Files at least this large get a progress bar.
PROGRESS_MIN_BYTES = 16 * 2**20

# Keys the generic converters map from input fields (``fields={"context": "question"}``).
MAPPABLE_FIELDS = ("context", "target", "system", "id", "candidates", "department")

# Placeholders of the built-in DxBench templates.
DXBENCH_PLACEHOLDERS = ("explicit_symptoms", "implicit_symptoms", "candidates", "department", "id")


class RowError(ValueError):
    """Why one record cannot become a row."""


class InvalidRowsError(DataError):
    """Some rows are bad and ``skip_invalid`` is off; nothing was written."""


@dataclass(frozen=True)
class Record:
    """One raw input record; ``problem`` is set when it could not even be decoded."""

    location: str
    value: Any
    problem: Optional[str] = None


@dataclass
class Case:
    """What an extractor takes from a record; the shared steps do the rest."""

    target: str
    id: Optional[str] = None
    candidates: Optional[List[str]] = None
    department: Optional[str] = None
    fields: Dict[str, str] = field(default_factory=dict)  # template values, besides {candidates}
    context: Optional[str] = None  # the context itself, when no template is used
    system: Optional[str] = None


@dataclass(frozen=True)
class ConvertOptions:
    format: str = "dxbench"
    template: Optional[str] = None  # a template file; None: the built-in one (dxbench) or the context field
    lang: str = "zh"
    system: Optional[str] = None  # None: the row's system field, else the built-in persona (dxbench)
    shuffle_candidates: bool = False
    seed: int = 0
    meta: bool = True
    skip_invalid: bool = False
    train_size: Optional[Union[int, float]] = None  # rows (int >= 1) or a fraction in (0, 1)
    fields: Mapping[str, str] = field(default_factory=dict)  # our key -> input field name
    hf_split: Optional[str] = None

    def __post_init__(self) -> None:
        if self.format not in CONVERTERS:
            raise ValueError(f"format {self.format!r} is unknown; choose one of {', '.join(CONVERTERS.names())}")
        if self.lang not in LANGUAGES:
            raise ValueError(f"lang {self.lang!r} is unknown; choose one of {', '.join(LANGUAGES)}")
        unknown = sorted(set(self.fields) - set(MAPPABLE_FIELDS))
        if unknown:
            raise ValueError(f"cannot map field(s) {', '.join(unknown)}; mappable: {', '.join(MAPPABLE_FIELDS)}")
        if self.fields and self.format == "dxbench":
            raise ValueError("field mapping applies to the jsonl and hf formats; DxBench fields are fixed")
        size = self.train_size
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, (int, float)):
                raise ValueError(f"train_size must be a number, got {size!r}")
            if isinstance(size, int) and size < 1 or isinstance(size, float) and not 0 < size < 1:
                raise ValueError(f"train_size {size} is neither a row count >= 1 nor a fraction in (0, 1)")


@dataclass(frozen=True)
class Converter:
    read: Callable[[str, ConvertOptions], Iterator[Record]]
    extract: Callable[[Dict[str, Any], ConvertOptions], Case]
    builtin_template: bool  # True: the built-in DxBench template unless a template file is given


CONVERTERS: Registry[Converter] = Registry("converter")


# ---------------------------------------------------------------- readers

_WHITESPACE = re.compile(r"[ \t\r\n]*")


def read_json_records(path: str, options: ConvertOptions) -> Iterator[Record]:
    """A JSON array or JSONL file (told apart by the first non-blank character)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        for number, value, problem in iter_jsonl(path):
            yield Record(f"{path}:{number}", value, problem)
        return
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None
    del data
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text).end() + 1  # past "["
    line, counted = 1, 0
    while True:
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith("]", pos):
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                "a JSON array cannot be read past a syntax error: fix the file"
            ) from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield Record(f"{path}:{line}", value)
        pos = _WHITESPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            line += text.count("\n", counted, pos)
            raise DataError(f"{path}:{line}: expected ',' or ']' after an array element; fix the file")


def read_hf_records(path: str, options: ConvertOptions) -> Iterator[Record]:
    """A Hugging Face dataset on local disk: a ``save_to_disk`` folder, or anything ``load_dataset`` reads."""
    import datasets

    folder = Path(path)
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            ds = datasets.load_from_disk(str(folder))
        else:
            ds = datasets.load_dataset(str(path))
    except Exception as exc:  # datasets raises many types; say which input failed and why
        raise DataError(f"{path}: cannot load it as a Hugging Face dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        split = options.hf_split or (splits[0] if len(splits) == 1 else None)
        if split not in ds:
            raise DataError(f"{path}: choose a split with --hf-split; the dataset has {', '.join(splits)}")
        ds = ds[split]
    for index, row in enumerate(ds):
        yield Record(f"{path}[{index}]", dict(row))


# ---------------------------------------------------------------- extractors


def _text(row: Mapping[str, Any], key: str, *, required: bool = True) -> Optional[str]:
    """``row[key]`` as a non-empty string; None when absent and not required."""
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing field {key!r}")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise RowError(f"field {key!r} is empty")
    return value


def _row_id(row: Mapping[str, Any], key: str, *, required: bool = True) -> Optional[str]:
    """``row[key]`` (a string or an integer) as a string; None when absent and not required."""
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing field {key!r}")
        return None
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise RowError(f"field {key!r} must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _string_list(row: Mapping[str, Any], key: str) -> List[str]:
    value = row[key]
    if not isinstance(value, list) or not value:
        raise RowError(f"field {key!r} must be a non-empty list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise RowError(f"field {key!r} must hold non-empty strings, got {item!r}")
    return value


def _symptoms(row: Mapping[str, Any], key: str) -> List[List[str]]:
    value = row[key]
    if not isinstance(value, list):
        raise RowError(f"field {key!r} must be a list of [name, \"True\"|\"False\"] pairs, got {value!r}")
    for pair in value:
        ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and pair[0].strip()
        if not ok or pair[1] not in ("True", "False"):
            raise RowError(f"field {key!r}: {pair!r} is not a [name, \"True\"|\"False\"] pair")
    return value


# The fields a DxBench-format case must have: the grader's target and candidates.
# The template's own fields (the built-in one uses both symptom lists) are
# required by ``_build_row`` through its placeholders; ``id`` and ``department``
# are optional (a case without an id gets its location, as in ``jsonl``).
DXBENCH_REQUIRED = ("disease", "candidate_diseases")
# Input field of each DxBench placeholder (the others share their field's name).
DXBENCH_FIELD_OF = {"candidates": "candidate_diseases"}


def extract_dxbench(row: Dict[str, Any], options: ConvertOptions) -> Case:
    """A DxBench-format case: ``disease`` and ``candidate_diseases`` always;
    ``explicit_symptoms`` and ``implicit_symptoms`` when the template uses them
    (the built-in one does); ``id`` and ``department`` when present. A field
    that is present is checked whether or not the template uses it."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in DXBENCH_REQUIRED if row.get(k) is None]
    if missing:
        raise RowError(
            f"missing field(s) {', '.join(map(repr, missing))}; a DxBench case needs "
            f"{', '.join(DXBENCH_REQUIRED)}, plus the fields its template uses"
        )
    case_id = _row_id(row, "id", required=False)
    department = _text(row, "department", required=False)
    fields = {"id": case_id, "department": department}
    for key in ("explicit_symptoms", "implicit_symptoms"):
        if row.get(key) is not None:
            fields[key] = repr(_symptoms(row, key))
    return Case(
        id=case_id,
        target=_text(row, "disease"),
        candidates=_string_list(row, "candidate_diseases"),
        department=department,
        fields={k: v for k, v in fields.items() if v is not None},
    )


def extract_mapped(row: Dict[str, Any], options: ConvertOptions) -> Case:
    """Any JSON object, its fields named by ``options.fields`` (default: our own key names).

    With a template, every top-level field is a placeholder value: strings as
    they are, anything else as a Python literal (``['a', 'b']``).
    """
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    name = {key: options.fields.get(key, key) for key in MAPPABLE_FIELDS}
    templated = options.template is not None
    candidates = None
    if row.get(name["candidates"]) is not None:
        candidates = _string_list(row, name["candidates"])
    system = row.get(name["system"])
    if system is not None and not isinstance(system, str):
        raise RowError(f"field {name['system']!r} must be a string, got {type(system).__name__}")
    return Case(
        id=_row_id(row, name["id"], required=False),
        target=_text(row, name["target"]),
        candidates=candidates,
        department=_text(row, name["department"], required=False),
        fields={k: v if isinstance(v, str) else repr(v) for k, v in row.items()} if templated else {},
        context=None if templated else _text(row, name["context"]),
        system=system,
    )


CONVERTERS.add("dxbench", Converter(read_json_records, extract_dxbench, builtin_template=True))
CONVERTERS.add("jsonl", Converter(read_json_records, extract_mapped, builtin_template=False))
CONVERTERS.add("hf", Converter(read_hf_records, extract_mapped, builtin_template=False))


# ---------------------------------------------------------------- summary


@dataclass
class ConvertSummary:
    """Counts and histograms of one conversion; ``report()`` is what the CLI prints."""

    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    duplicate_candidate_cases: int = 0
    candidate_counts: Counter = field(default_factory=Counter)  # n candidates -> rows
    answer_positions: Counter = field(default_factory=Counter)  # 1-based position of the target -> rows
    expected_positions: Counter = field(default_factory=Counter)  # the same under a uniformly random order
    prompt_chars: List[int] = field(default_factory=list)  # len(system) + len(context) per row
    outputs: Dict[str, int] = field(default_factory=dict)  # written file -> rows
    rejects_path: Optional[str] = None

    def add(self, n_candidates: Optional[int], position: Optional[int], had_duplicates: bool, chars: int) -> None:
        self.rows_out += 1
        self.prompt_chars.append(chars)
        self.duplicate_candidate_cases += had_duplicates
        if n_candidates is not None:
            self.candidate_counts[n_candidates] += 1
            self.answer_positions[position] += 1
            for p in range(1, n_candidates + 1):
                self.expected_positions[p] += 1 / n_candidates

    def skew_warning(self) -> Optional[str]:
        """A warning when some answer position is much more common than chance.

        Under a uniform order the expected count at position p is
        E_p = sum over rows with n >= p of 1/n. Position p is skewed when its
        observed count O_p > 1.25 * E_p and O_p - E_p > 3 * sqrt(E_p) (three
        standard deviations, roughly), so small files do not warn by chance.
        """
        for p in sorted(self.answer_positions):
            observed, expected = self.answer_positions[p], self.expected_positions[p]
            if observed > 1.25 * expected and observed - expected > 3 * math.sqrt(expected):
                return (
                    f"the answer is at position {p} in {observed} of {self.rows_out} rows; "
                    f"a random order would give about {expected:.0f}. A model can score by keeping the given order: "
                    "shuffle the candidates (--shuffle-candidates)"
                )
        return None

    def report(self) -> List[str]:
        lines = [
            f"rows in: {self.rows_in}, out: {self.rows_out}, rejected: {self.rows_rejected}",
            f"cases with duplicate candidates (removed, first kept): {self.duplicate_candidate_cases}",
        ]
        if self.candidate_counts:
            hist = ", ".join(f"{n}: {c}" for n, c in sorted(self.candidate_counts.items()))
            lines.append(f"candidates per case: {hist}")
            hist = ", ".join(
                f"{p}: {c} ({self.expected_positions[p]:.1f} by chance)" for p, c in sorted(self.answer_positions.items())
            )
            lines.append(f"answer position: {hist}")
        if self.prompt_chars:
            chars = sorted(self.prompt_chars)
            p95 = chars[min(len(chars) - 1, int(0.95 * len(chars)))]
            lines.append(
                f"prompt length (characters, system + context): min {chars[0]}, "
                f"median {statistics.median(chars):.0f}, p95 {p95}, max {chars[-1]}"
            )
        lines += [f"wrote {rows} rows to {path}" for path, rows in self.outputs.items()]
        if self.rejects_path is not None:
            lines.append(f"wrote {self.rows_rejected} rejected rows to {self.rejects_path}")
        warning = self.skew_warning()
        if warning:
            lines.append(f"WARNING: {warning}")
        return lines


# ---------------------------------------------------------------- conversion


def dedupe_candidates(candidates: List[str]) -> Tuple[List[str], bool]:
    """Drop candidates equal to an earlier one after ``normalize``; return (kept, any_dropped)."""
    seen = set()
    kept = []
    for c in candidates:
        key = normalize(c)
        if key not in seen:
            seen.add(key)
            kept.append(c)
    return kept, len(kept) < len(candidates)


def _resolve_template(converter: Converter, options: ConvertOptions) -> Optional[Template]:
    if options.template is not None:
        template = load_template(options.template)
    elif converter.builtin_template:
        template = builtin_template(options.lang)
    else:
        return None
    if converter.builtin_template:
        unknown = sorted(template.placeholders - set(DXBENCH_PLACEHOLDERS))
        if unknown:
            raise TemplateError(
                f"{template.name}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                f"a DxBench template can use {', '.join('{' + p + '}' for p in DXBENCH_PLACEHOLDERS)}"
            )
    return template


def convert(
    input_path: Union[str, Path],
    *,
    out_dir: Optional[Union[str, Path]] = None,
    output: Optional[Union[str, Path]] = None,
    options: ConvertOptions = ConvertOptions(),
) -> ConvertSummary:
    """Convert ``input_path`` and write the rows; see the module docstring for the steps.

    Give ``out_dir`` (writes ``data.jsonl``, or ``train.jsonl`` and
    ``eval.jsonl`` with ``train_size``) or ``output`` (one file, no split).
    Raises ``DataError`` on bad rows (unless ``skip_invalid``) and bad templates.
    """
    if (out_dir is None) == (output is None):
        raise ValueError("give exactly one of out_dir and output")
    if output is not None and options.train_size is not None:
        raise ValueError("a train/eval split writes two files: give out_dir instead of output")
    input_path = str(input_path)
    if not Path(input_path).exists():
        raise DataError(f"{input_path}: input not found")
    converter = CONVERTERS.get(options.format)
    template = _resolve_template(converter, options)
    default_system = options.system if options.system is not None else (
        DEFAULT_SYSTEM[options.lang] if converter.builtin_template else None
    )
    source = Path(input_path).name
    target_dir = Path(out_dir) if out_dir is not None else Path(output).parent

    summary = ConvertSummary()
    problems: List[str] = []
    rejects: List[Dict[str, Any]] = []
    accepted_ids: Dict[str, str] = {}
    large = Path(input_path).is_file() and Path(input_path).stat().st_size >= PROGRESS_MIN_BYTES
    with tempfile.TemporaryFile("w+", encoding="utf-8") as staging:
        records = tqdm(converter.read(input_path, options), desc="convert-data", unit=" rows", disable=not large)
        for record in records:
            summary.rows_in += 1
            try:
                if record.problem is not None:
                    raise RowError(record.problem)
                case = converter.extract(record.value, options)
                row_id = case.id or record.location
                if row_id in accepted_ids:
                    raise RowError(f"duplicate id {row_id!r} (first at {accepted_ids[row_id]}); ids must be unique")
                row, stats = _build_row(case, row_id, template, default_system, source, options)
            except RowError as exc:
                problems.append(f"{record.location}: {exc}")
                rejects.append({"location": record.location, "reason": str(exc), "row": record.value})
                continue
            accepted_ids[row_id] = record.location
            staging.write(json.dumps(row, ensure_ascii=False) + "\n")
            summary.add(*stats)
        summary.rows_rejected = len(rejects)
        if problems and not options.skip_invalid:
            raise InvalidRowsError(problems)
        if summary.rows_out == 0:
            raise DataError(f"{input_path}: no valid rows to write")

        if out_dir is None:
            outputs = {Path(output): lambda i: True}
        elif options.train_size is None:
            outputs = {target_dir / "data.jsonl": lambda i: True}
        else:
            train = _train_indices(summary.rows_out, options.train_size, options.seed)
            outputs = {target_dir / "train.jsonl": train.__contains__, target_dir / "eval.jsonl": lambda i: i not in train}
        for path, keep in outputs.items():
            staging.seek(0)
            rows = (json.loads(line) for i, line in enumerate(staging) if keep(i))
            summary.outputs[str(path)] = write_jsonl_atomic(path, rows)
    if options.skip_invalid:
        summary.rejects_path = str(target_dir / "rejects.jsonl")
        write_jsonl_atomic(summary.rejects_path, rejects)
    return summary


def _build_row(
    case: Case,
    row_id: str,
    template: Optional[Template],
    default_system: Optional[str],
    source: str,
    options: ConvertOptions,
) -> Tuple[Dict[str, Any], Tuple[Optional[int], Optional[int], bool, int]]:
    """The output row and its summary stats (n candidates, answer position, had duplicates, prompt chars)."""
    candidates, had_duplicates, position = None, False, None
    if case.candidates is not None:
        candidates, had_duplicates = dedupe_candidates(case.candidates)
        if options.shuffle_candidates:
            random.Random(f"{options.seed}:{row_id}").shuffle(candidates)
        normalized = [normalize(c) for c in candidates]
        if normalize(case.target) not in normalized:
            raise RowError(f"target {case.target!r} is not among the candidates {case.candidates}")
        position = normalized.index(normalize(case.target)) + 1
    if template is None:
        context = case.context
    else:
        values = dict(case.fields)
        if candidates is not None:
            values["candidates"] = repr(candidates)
        missing = sorted(template.placeholders - set(values))
        if missing:
            names = [_field_of(m, options) for m in missing]
            raise RowError(
                f"template {template.name} uses {', '.join('{' + m + '}' for m in missing)}, but this row has "
                f"no {', '.join(map(repr, names))} field; add the field to the row or remove the placeholder"
            )
        context = template.render(values)
    system = options.system if options.system is not None else (case.system or default_system)
    row: Dict[str, Any] = {"system": system if system is not None else "", "context": context, "target": case.target}
    if options.meta:
        meta = {"id": row_id, "candidates": candidates, "department": case.department, "source": source}
        row["meta"] = {k: v for k, v in meta.items() if v is not None}
    stats = (len(candidates) if candidates is not None else None, position, had_duplicates, len(row["system"]) + len(context))
    return row, stats


def _field_of(placeholder: str, options: ConvertOptions) -> str:
    """The input field a template placeholder is filled from."""
    if options.format == "dxbench":
        return DXBENCH_FIELD_OF.get(placeholder, placeholder)
    if placeholder == "candidates":
        return options.fields.get("candidates", "candidates")
    return placeholder


def _train_indices(n_rows: int, train_size: Union[int, float], seed: int) -> set:
    """The indices of the training rows: the first N of a ``random.Random(seed)`` permutation."""
    n_train = train_size if isinstance(train_size, int) else round(train_size * n_rows)
    if not 1 <= n_train < n_rows:
        raise DataError(
            f"train size {train_size} gives {n_train} training rows of {n_rows}; "
            f"both train and eval need at least one row (use 1..{n_rows - 1}, or no split)"
        )
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return set(order[:n_train])
