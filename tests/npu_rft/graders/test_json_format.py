from npu_rft.data.schema import Example
from npu_rft.graders.json_format import json_format
from npu_rft.graders.parsing import NO_JSON, WRONG_TYPES

EXAMPLE = Example("...", "Flu", meta={"candidates": ["Flu", "Cold"]})


def test_structure_only():
    assert json_format('{"possible_diseases": ["Anything", "at all"]}', EXAMPLE).score == 1.0
    assert json_format('{"possible_diseases": ["Anything"]}', EXAMPLE).parsed == ["Anything"]
    assert json_format('{"possible_diseases": []}', EXAMPLE).score == 1.0


def test_failures_carry_the_reason():
    grade = json_format("Flu", EXAMPLE)
    assert (grade.score, grade.parsed, grade.reason) == (0.0, None, NO_JSON)
    assert json_format('{"possible_diseases": [1]}', EXAMPLE).reason == WRONG_TYPES
