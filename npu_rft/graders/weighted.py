"""``weighted``: several graders as one grader.

Its score is ``Reward(specs)``'s total, the weighted mean
``sum_i w_i * s_i / sum_i w_i``; its ``parsed`` and ``reason`` are those of the
first grader in ``specs``. It is built from specs, so it is not a registered
name: ``weighted([GraderSpec("inverse_rank", 0.9), GraderSpec("json_format", 0.1)])``.
"""
from __future__ import annotations

from typing import Sequence

from npu_rft.data.schema import Example
from npu_rft.graders.base import Grade, Grader
from npu_rft.graders.reward import GraderSpec, Reward


def weighted(specs: Sequence[GraderSpec]) -> Grader:
    reward = Reward(specs)
    first = reward.specs[0].name

    def weighted_grader(completion: str, example: Example) -> Grade:
        result = reward(completion, example)
        return Grade(result.total, result.grades[first].parsed, result.grades[first].reason)

    weighted_grader.needs_candidates = any(  # type: ignore[attr-defined]
        getattr(g, "needs_candidates", False) for g in reward.graders.values()
    )
    return weighted_grader
