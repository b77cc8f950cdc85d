"""``clean_end``: 1.0 when the completion ends with its ``possible_diseases`` ranking,
else 0.0 with the reason.

"Ends with" means that after the list's closing ``]`` there are only closing braces,
a closing code fence (```` ``` ````) and whitespace, and that the completion (after any
thinking) names the ``possible_diseases`` key once: an answer written again is a
run-on. ``inverse_rank`` reads the ranking and ignores what follows it, so under RL alone nothing keeps a model from running on
after its answer to the token limit, and a run-on can break the JSON of every sample
at once. A small weight of ``clean_end`` beside ``inverse_rank`` rewards ending the
answer (the quickstart's GRPO arm: 0.25; docs/quickstart.md).
"""
from __future__ import annotations

import re

from npu_rft.data.schema import Example
from npu_rft.graders.base import Grade, register_grader
from npu_rft.graders.parsing import KEY, find_ranking, strip_thinking

RUN_ON = "run-on: text after the ranking"
REPEATED = "run-on: more than one ranking"
_CLOSING = re.compile(r"[\s}]*(?:```\s*)?")


@register_grader("clean_end")
def clean_end(completion: str, example: Example) -> Grade:
    items, rest, reason = find_ranking(completion)
    if items is None:
        return Grade(0.0, None, reason)
    if _CLOSING.fullmatch(rest) is None:
        return Grade(0.0, None, RUN_ON)
    if strip_thinking(completion).count(KEY) > 1:
        return Grade(0.0, None, REPEATED)
    return Grade(1.0, items, None)
