"""``json_format``: 1.0 when the completion holds a ``possible_diseases`` list of strings
(the rules of ``parsing.parse_ranking``), else 0.0 with the reason.

It checks the structure only, not the content; ``Grade.parsed`` is the list as written.
Useful as a small extra reward for the format next to ``inverse_rank``.
"""
from __future__ import annotations

from npu_rft.data.schema import Example
from npu_rft.graders.base import Grade, register_grader
from npu_rft.graders.parsing import parse_ranking


@register_grader("json_format")
def json_format(completion: str, example: Example) -> Grade:
    items, reason = parse_ranking(completion)
    return Grade(0.0 if items is None else 1.0, items, reason)
