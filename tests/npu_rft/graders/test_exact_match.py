import pytest

from npu_rft.data.schema import Example
from npu_rft.graders.exact_match import exact_match
from npu_rft.graders.parsing import UNCLOSED_THINK

EXAMPLE = Example("What is 2 + 2?", "Four")


@pytest.mark.parametrize(
    "completion, score, parsed",
    [
        ("Four", 1.0, "four"),
        ("  ＦＯＵＲ \n", 1.0, "four"),
        ("<think>maybe five</think> four", 1.0, "four"),
        ("Four.", 0.0, "four."),
        ("Five", 0.0, "five"),
        # a ranking: its first item is the answer (Top@1)
        ('{"possible_diseases": ["four", "five"]}', 1.0, "four"),
        ('{"possible_diseases": ["five", "four"]}', 0.0, "five"),
    ],
)
def test_exact_match(completion, score, parsed):
    grade = exact_match(completion, EXAMPLE)
    assert (grade.score, grade.parsed, grade.reason) == (score, parsed, None)


def test_failures():
    assert exact_match("<think>Four", EXAMPLE).reason == UNCLOSED_THINK
    assert exact_match("  ", EXAMPLE).reason == "empty answer"
    assert exact_match('{"possible_diseases": []}', EXAMPLE).reason is None  # an empty ranking: the text is the answer
