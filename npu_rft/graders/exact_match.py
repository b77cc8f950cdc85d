"""``exact_match``: the answer equals the target after ``normalize`` (NFKC, strip, casefold).

The answer is the first item of the ``possible_diseases`` list when the
completion holds one (so on ranking data this is Top@1), and otherwise the
whole text after any ``</think>``. ``Grade.parsed`` is the normalised answer.
An unterminated ``<think>`` or an empty answer scores 0 with that reason.
"""
from __future__ import annotations

from npu_rft.data.schema import Example, normalize
from npu_rft.graders.base import Grade, register_grader
from npu_rft.graders.parsing import UNCLOSED_THINK, parse_ranking, strip_thinking


@register_grader("exact_match")
def exact_match(completion: str, example: Example) -> Grade:
    answer = strip_thinking(completion)
    if answer is None:
        return Grade(0.0, None, UNCLOSED_THINK)
    items, _ = parse_ranking(answer)
    if items:
        answer = items[0]
    answer = normalize(answer)
    if not answer:
        return Grade(0.0, None, "empty answer")
    return Grade(float(answer == normalize(example.target)), answer)
