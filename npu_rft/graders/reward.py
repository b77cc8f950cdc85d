"""The reward of a completion: several graders, weighted.

``Reward(specs)(completion, example)`` runs every grader and returns
``RewardResult(total, grades)`` with

    total = sum_i w_i * s_i / sum_i w_i

(a weighted mean, so the total stays in [0, 1] whatever the weights; a grader
of weight 0 is computed and logged but does not count). ``grades`` maps each
grader's name to its ``Grade``, so the trainer and evaluation take the scores,
the parsed answers and the format failures from there, never parsing again.

In a YAML config the specs read ``graders: [{name: inverse_rank, weight: 0.9},
{name: json_format, weight: 0.1}]``; on the command line ``NAME[=WEIGHT]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

from npu_rft.data.schema import Example
from npu_rft.graders.base import GRADERS, Grade, get_grader, validate_examples


@dataclass(frozen=True)
class GraderSpec:
    """One grader of the reward: a registered name or ``package.module:function``, and its weight."""

    name: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("a grader needs a name; use a registered grader or 'package.module:function'")
        if ":" not in self.name and self.name not in GRADERS:
            raise ValueError(
                f"unknown grader {self.name!r}; choose one of {', '.join(GRADERS.names())} "
                "or a user grader 'package.module:function'"
            )
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"grader {self.name}: weight must be a finite number >= 0, got {w!r}")

    @classmethod
    def parse(cls, text: str) -> "GraderSpec":
        """``"inverse_rank"`` or ``"inverse_rank=0.9"`` (the command-line form)."""
        name, sep, weight = text.rpartition("=")
        if not sep:
            return cls(text.strip())
        try:
            return cls(name.strip(), float(weight))
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}; write NAME or NAME=WEIGHT, e.g. inverse_rank=0.9") from None


@dataclass(frozen=True)
class RewardResult:
    total: float  # the weighted mean of the scores, in [0, 1]
    grades: Dict[str, Grade]  # grader name -> its Grade, in spec order


class Reward:
    """The combined reward of ``specs`` (at least one; distinct names; total weight > 0)."""

    def __init__(self, specs: Sequence[GraderSpec]) -> None:
        if not specs:
            raise ValueError("the reward needs at least one grader, e.g. [GraderSpec('inverse_rank')]")
        names = [s.name for s in specs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"grader(s) {', '.join(repeated)} listed twice; list each grader once with its weight")
        self.total_weight = float(sum(s.weight for s in specs))
        if self.total_weight <= 0:
            raise ValueError("the grader weights sum to 0; give at least one grader a positive weight")
        self.specs = tuple(specs)
        self.graders = {s.name: get_grader(s.name) for s in specs}

    def __call__(self, completion: str, example: Example) -> RewardResult:
        grades = {name: grader(completion, example) for name, grader in self.graders.items()}
        total = sum(s.weight * grades[s.name].score for s in self.specs) / self.total_weight
        return RewardResult(min(1.0, total), grades)  # min: rounding can exceed 1 by an ulp

    def validate(self, examples: Sequence[Example]) -> None:
        """``validate_examples`` for every grader (``DataError`` naming the bad rows)."""
        for name in self.graders:
            validate_examples(name, examples)


@dataclass(frozen=True)
class RewardSummary:
    count: int
    mean_total: float
    mean_scores: Dict[str, float]  # grader -> mean score
    failure_rates: Dict[str, float]  # grader -> fraction of completions with a reason (format failures)


def summarize_rewards(reward: Reward, pairs: Sequence[Tuple[Example, str]]) -> RewardSummary:
    """Grade every ``(example, completion)`` pair and average the results."""
    if not pairs:
        raise ValueError("nothing to grade: no (example, completion) pairs")
    results = [reward(completion, example) for example, completion in pairs]
    n = len(results)
    return RewardSummary(
        count=n,
        mean_total=sum(r.total for r in results) / n,
        mean_scores={name: sum(r.grades[name].score for r in results) / n for name in reward.graders},
        failure_rates={name: sum(r.grades[name].reason is not None for r in results) / n for name in reward.graders},
    )
