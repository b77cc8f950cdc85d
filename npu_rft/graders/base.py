"""Graders: pure functions ``(completion: str, example: Example) -> Grade``.

A grader reads text only: no tensors, tokenizer or device, bounded time on any
input, never ``eval``/``exec`` of model text, and it does not raise on a bad
completion (it scores 0 and says why). It may raise ``DataError`` on a bad
*example* (say, inverse_rank on a row without ``meta.candidates``);
``validate_examples`` finds those once, when the data is loaded.

Built-in graders register in ``GRADERS`` with ``register_grader``. A user
grader is named by its import path ``"package.module:function"``: it is
imported and called as it is, so it is trusted code, like a config file that
names it. It may return a ``Grade`` or a plain number, which is wrapped.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence

from npu_rft.data.schema import DataError, Example, normalize
from npu_rft.registry import Registry


@dataclass(frozen=True)
class Grade:
    """A grader's verdict on one completion.

    ``score`` is in [0, 1]; ``parsed`` is the answer as the grader read it (for
    inverse_rank, the cleaned list); ``reason`` is None when the completion
    was parsed and otherwise says why not (a format failure).
    """

    score: float
    parsed: Any = None
    reason: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.score, bool) or not isinstance(self.score, (int, float)) or not 0.0 <= self.score <= 1.0:
            raise ValueError(f"a grade's score must be a number in [0, 1], got {self.score!r}")

    def __float__(self) -> float:
        return float(self.score)


Grader = Callable[[str, Example], Grade]

GRADERS: Registry[Grader] = Registry("grader")


def register_grader(name: str, *, needs_candidates: bool = False) -> Callable[[Grader], Grader]:
    """Register a built-in grader; ``needs_candidates`` makes ``validate_examples``
    require ``meta.candidates`` containing the target."""

    def decorator(fn: Grader) -> Grader:
        fn.needs_candidates = needs_candidates  # type: ignore[attr-defined]
        GRADERS.add(name, fn)
        return fn

    return decorator


def get_grader(name: str) -> Grader:
    """A registered grader by name, or a user grader ``"module:function"`` wrapped to return a ``Grade``."""
    if ":" not in name:
        return GRADERS.get(name)
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot load grader {name!r} ({exc}); give an importable 'package.module:function' "
            f"or one of {', '.join(GRADERS.names())}"
        ) from None
    if not callable(fn):
        raise ValueError(f"grader {name!r} is not callable; point it at a function (completion, example) -> float")

    def user_grader(completion: str, example: Example) -> Grade:
        result = fn(completion, example)
        if isinstance(result, Grade):
            return result
        if isinstance(result, bool) or not isinstance(result, (int, float)) or not 0.0 <= result <= 1.0:
            raise ValueError(
                f"grader {name} returned {result!r} for {example.id}; a grader returns a float in [0, 1] or a Grade"
            )
        return Grade(float(result))

    user_grader.__name__ = attr
    user_grader.needs_candidates = getattr(fn, "needs_candidates", False)  # type: ignore[attr-defined]
    return user_grader


def candidates_of(example: Example) -> List[str]:
    """``meta.candidates``, normalised and de-duplicated (first kept); ``DataError`` when missing."""
    raw = example.meta.get("candidates")
    if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
        raise DataError(
            f"{example.location or example.id}: this grader needs meta.candidates (a non-empty list of strings); "
            "convert the data with candidates (npu-rft convert-data, --field candidates=NAME for your own data)"
        )
    return list(dict.fromkeys(normalize(c) for c in raw))


def validate_examples(grader_name: str, examples: Iterable[Example]) -> None:
    """Check once that every example has what the grader needs; ``DataError`` names each bad row.

    Graders registered with ``needs_candidates`` need ``meta.candidates`` with the target among them.
    """
    if not getattr(get_grader(grader_name), "needs_candidates", False):
        return
    problems = []
    for example in examples:
        try:
            candidates = candidates_of(example)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if normalize(example.target) not in candidates:
            problems.append(
                f"{example.location or example.id}: target {example.target!r} is not among meta.candidates; "
                "fix the row or its candidates"
            )
    if problems:
        raise DataError(problems)


def clean_ranking(items: Sequence[str], candidates: Sequence[str]) -> List[str]:
    """Normalise ``items``, drop duplicates (first kept) and anything not in ``candidates`` (normalised)."""
    allowed = set(candidates)
    cleaned: List[str] = []
    for item in items:
        key = normalize(item)
        if key in allowed and key not in cleaned:
            cleaned.append(key)
    return cleaned


def topk_hit(parsed: Optional[Sequence[str]], target: str, k: int) -> bool:
    """True when the target (normalised) is among the first ``k`` entries of a cleaned list."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return parsed is not None and normalize(target) in parsed[:k]

