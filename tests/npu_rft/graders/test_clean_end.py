import pytest

from npu_rft.data.schema import Example
from npu_rft.graders import get_grader
from npu_rft.graders.clean_end import REPEATED, RUN_ON, clean_end
from npu_rft.graders.parsing import NO_JSON, WRONG_TYPES, text_after_ranking

EXAMPLE = Example("...", "Flu", meta={"candidates": ["Flu", "Cold"]})


@pytest.mark.parametrize("completion", [
    '{"possible_diseases": ["Flu", "Cold"]}',
    'possible_diseases": ["Flu", "Cold"]}',  # the quickstart's prompt opens the object
    '{"possible_diseases": ["Flu"]}  \n',
    '```json\n{"possible_diseases": ["Flu"]}\n```\n',
    'Thinking it over.\n{"possible_diseases": ["Flu"]}',  # prose before the answer is not a run-on
    '<think>possible_diseases: ["Cold"]?</think>{"possible_diseases": ["Flu"]}',
])
def test_an_answer_that_ends_with_its_ranking_scores_1(completion):
    grade = clean_end(completion, EXAMPLE)
    assert (grade.score, grade.reason) == (1.0, None)
    assert grade.parsed == ["Flu", "Cold"] or grade.parsed == ["Flu"]


@pytest.mark.parametrize("completion, reason", [
    ('{"possible_diseases": ["Flu"]} because of the fever', RUN_ON),
    ('possible_diseases": ["Flu", "Cold"]}Cold", "Flu"', RUN_ON),  # the run-on of a GRPO run
    ('{"possible_diseases": ["Flu"]}\n{"possible_diseases": ["Flu"]}', REPEATED),
    ("Flu", NO_JSON),
    ('{"possible_diseases": [1]}', WRONG_TYPES),
])
def test_run_ons_and_format_failures_score_0_with_the_reason(completion, reason):
    grade = clean_end(completion, EXAMPLE)
    assert (grade.score, grade.parsed, grade.reason) == (0.0, None, reason)


def test_registered_and_the_text_after_the_ranking():
    assert get_grader("clean_end") is clean_end
    assert text_after_ranking('{"possible_diseases": ["Flu"]} tail') == ("} tail", None)
    assert text_after_ranking("nothing") == (None, NO_JSON)
