import pytest

from npu_rft.data.schema import DataError, Example
from npu_rft.graders import Grade, GraderSpec, Reward
from npu_rft.graders.parsing import NO_JSON
from npu_rft.graders.reward import summarize_rewards

EXAMPLE = Example("...", "Flu", meta={"candidates": ["Cold", "Flu", "Covid"]}, location="d.jsonl:1")
SECOND = '{"possible_diseases": ["Cold", "Flu", "Covid"]}'  # inverse_rank 0.5, json_format 1, exact_match 0


def test_total_is_the_weighted_mean():
    reward = Reward([GraderSpec("inverse_rank", 3.0), GraderSpec("json_format", 1.0), GraderSpec("exact_match", 0.0)])
    result = reward(SECOND, EXAMPLE)
    assert result.total == pytest.approx((3 * 0.5 + 1 * 1.0 + 0 * 0.0) / 4)
    assert list(result.grades) == ["inverse_rank", "json_format", "exact_match"]
    assert result.grades["inverse_rank"] == Grade(0.5, ["cold", "flu", "covid"])
    assert reward("no answer", EXAMPLE).grades["json_format"].reason == NO_JSON


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": ""}, "a grader needs a name"),
        ({"name": "rank"}, "unknown grader 'rank'; choose one of clean_end, exact_match, inverse_rank, json_format"),
        ({"name": "inverse_rank", "weight": -1}, "weight must be a finite number >= 0"),
        ({"name": "inverse_rank", "weight": float("inf")}, "weight must be a finite number >= 0"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GraderSpec(**kwargs)


def test_spec_parse():
    assert GraderSpec.parse("inverse_rank") == GraderSpec("inverse_rank", 1.0)
    assert GraderSpec.parse("json_format=0.25") == GraderSpec("json_format", 0.25)
    assert GraderSpec.parse("pkg.mod:fn=2") == GraderSpec("pkg.mod:fn", 2.0)
    with pytest.raises(ValueError, match="write NAME or NAME=WEIGHT"):
        GraderSpec.parse("inverse_rank=high")


def test_reward_validation():
    with pytest.raises(ValueError, match="at least one grader"):
        Reward([])
    with pytest.raises(ValueError, match="inverse_rank listed twice"):
        Reward([GraderSpec("inverse_rank"), GraderSpec("inverse_rank", 2)])
    with pytest.raises(ValueError, match="weights sum to 0"):
        Reward([GraderSpec("inverse_rank", 0)])
    with pytest.raises(DataError, match="d.jsonl:9: this grader needs meta.candidates"):
        Reward([GraderSpec("json_format"), GraderSpec("inverse_rank")]).validate([Example("c", "t", location="d.jsonl:9")])


def test_summarize_rewards():
    reward = Reward([GraderSpec("inverse_rank"), GraderSpec("json_format")])
    summary = summarize_rewards(reward, [(EXAMPLE, SECOND), (EXAMPLE, "junk")])
    assert summary.count == 2
    assert summary.mean_scores == {"inverse_rank": 0.25, "json_format": 0.5}
    assert summary.failure_rates == {"inverse_rank": 0.5, "json_format": 0.5}
    assert summary.mean_total == pytest.approx((0.75 + 0.0) / 2)
