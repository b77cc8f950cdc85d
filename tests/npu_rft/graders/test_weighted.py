import pytest

from npu_rft.data.schema import Example
from npu_rft.graders import Grade, GraderSpec, weighted
from npu_rft.graders.parsing import NO_JSON

EXAMPLE = Example("...", "Flu", meta={"candidates": ["Cold", "Flu", "Covid"]})


def test_score_is_weighted_mean_and_parsed_reason_come_from_the_first_member():
    grader = weighted([GraderSpec("json_format", 1.0), GraderSpec("inverse_rank", 3.0)])
    grade = grader("{'possible_diseases': ['Cold', 'Flu']}", EXAMPLE)
    assert grade == Grade((1.0 * 1.0 + 3.0 * 0.5) / 4.0, ["Cold", "Flu"], None)  # json_format's parsed: as written
    assert grader("nothing", EXAMPLE) == Grade(0.0, None, NO_JSON)
    assert grader.needs_candidates  # inverse_rank is a member


def test_member_order_decides_parsed():
    grade = weighted([GraderSpec("inverse_rank"), GraderSpec("json_format")])('{"possible_diseases": ["FLU"]}', EXAMPLE)
    assert grade.score == pytest.approx(1.0) and grade.parsed == ["flu"]
