import sys
import textwrap

import pytest

from npu_rft.data.schema import DataError, Example
from npu_rft.graders import GRADERS, Grade, get_grader, topk_hit, validate_examples
from npu_rft.registry import RegistryError

EXAMPLE = Example("...", "Flu", meta={"id": "r1", "candidates": ["Cold", "Flu"]}, location="d.jsonl:1")


def test_grade_is_a_checked_float():
    assert float(Grade(0.25)) == 0.25
    for bad in (-0.1, 1.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            Grade(bad)


def test_builtin_names_and_unknown_name():
    assert GRADERS.names() == ["clean_end", "exact_match", "inverse_rank", "json_format"]
    with pytest.raises(RegistryError, match="unknown grader 'rank'; known graders: clean_end, exact_match, inverse_rank, json_format"):
        get_grader("rank")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_graders.py").write_text(textwrap.dedent("""
        from npu_rft.graders import Grade

        def length_bonus(completion, example):
            return min(1.0, len(completion) / 10)

        def as_grade(completion, example):
            return Grade(0.5, parsed=completion.upper())

        def too_big(completion, example):
            return 2

        def not_a_number(completion, example):
            return "0.5"

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_graders"
    sys.modules.pop("my_graders", None)


def test_user_grader_float_is_wrapped(user_module):
    grader = get_grader(f"{user_module}:length_bonus")
    assert grader("abcde", EXAMPLE) == Grade(0.5)
    assert get_grader(f"{user_module}:as_grade")("ab", EXAMPLE) == Grade(0.5, parsed="AB")


@pytest.mark.parametrize("name", ["too_big", "not_a_number"])
def test_user_grader_out_of_range_is_an_error(user_module, name):
    with pytest.raises(ValueError, match=f"grader {user_module}:{name} returned .* for r1; a grader returns a float in"):
        get_grader(f"{user_module}:{name}")("x", EXAMPLE)


def test_user_grader_that_cannot_load(user_module):
    with pytest.raises(ValueError, match="cannot load grader 'no_such_module:f'"):
        get_grader("no_such_module:f")
    with pytest.raises(ValueError, match="cannot load grader 'my_graders:missing'"):
        get_grader(f"{user_module}:missing")
    with pytest.raises(ValueError, match="is not callable"):
        get_grader(f"{user_module}:NOT_CALLABLE")


def test_validate_examples():
    no_candidates = Example("...", "Flu", location="d.jsonl:2")
    wrong_target = Example("...", "Flu", meta={"candidates": ["Cold"]}, location="d.jsonl:3")
    validate_examples("inverse_rank", [EXAMPLE])
    validate_examples("exact_match", [no_candidates])  # needs no candidates
    with pytest.raises(DataError) as info:
        validate_examples("inverse_rank", [EXAMPLE, no_candidates, wrong_target])
    assert [p.split(": ")[0] for p in info.value.problems] == ["d.jsonl:2", "d.jsonl:3"]
    assert "target 'Flu' is not among meta.candidates" in info.value.problems[1]


def test_topk_hit_on_the_cleaned_list():
    cleaned = ["cold", "flu", "covid"]
    assert not topk_hit(cleaned, "Flu", 1)
    assert topk_hit(cleaned, " ＦＬＵ", 2) and topk_hit(cleaned, "flu", 5)
    assert not topk_hit(None, "flu", 3)  # unparseable: no hit
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_hit(cleaned, "flu", 0)
