"""``inverse_rank``: how high the model ranks the true answer among the candidates.

1. L = the parsed ``possible_diseases`` list (``parsing.parse_ranking``), each
   item normalised (NFKC, strip, casefold), duplicates removed keeping the first.
2. Items not among ``meta.candidates`` (normalised the same way) are dropped;
   n = the number of distinct candidates.
3. If the target is not in L the score is 0; otherwise, with i its 0-based
   index, the score is 1 - i / (n - 1), and 1.0 when n = 1.
4. Unparseable output scores 0 with the reason (a format failure).

Padding the list with junk or repeating the answer cannot raise the score:
junk and repeats are dropped before the index is taken. ``Grade.parsed`` is
the cleaned L, for ``topk_hit``.
"""
from __future__ import annotations

from npu_rft.data.schema import Example, normalize
from npu_rft.graders.base import Grade, candidates_of, clean_ranking, register_grader
from npu_rft.graders.parsing import parse_ranking


@register_grader("inverse_rank", needs_candidates=True)
def inverse_rank(completion: str, example: Example) -> Grade:
    candidates = candidates_of(example)
    items, reason = parse_ranking(completion)
    if items is None:
        return Grade(0.0, None, reason)
    ranking = clean_ranking(items, candidates)
    target = normalize(example.target)
    if target not in ranking:
        return Grade(0.0, ranking)
    n = len(candidates)
    score = 1.0 if n == 1 else 1.0 - ranking.index(target) / (n - 1)
    return Grade(score, ranking)
