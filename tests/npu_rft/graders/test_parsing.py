import pytest

from npu_rft.graders.parsing import MAX_ITEMS, NO_JSON, NO_LIST, UNCLOSED_THINK, WRONG_TYPES, parse_ranking, strip_thinking


@pytest.mark.parametrize(
    "completion, items",
    [
        ('{"possible_diseases": ["A", "B"]}', ["A", "B"]),
        ("```json\n{\n  \"possible_diseases\": [\n    \"A\",\n    \"B\"\n  ]\n}\n```", ["A", "B"]),
        ('Ranking follows. {"possible_diseases": ["A"]} That is all.', ["A"]),
        ("{'possible_diseases': ['A', \"B's\", 'C\\'s']}", ["A", "B's", "C's"]),
        ("possible_diseases = ['A', 'B',]", ["A", "B"]),
        ('{"possible_diseases": []}', []),
        ('{"possible_diseases" : ["\\u75be\\u75c5", "x\\"y"]}', ["疾病", 'x"y']),
        ("{'possible_diseases': ['caf\\xe9', '\\u75be']}", ["café", "疾"]),
        ('{"possible_diseases": ["bad \\q escape"]}', ["bad \\q escape"]),
        # the last key with a list counts: an echoed example first, the answer last
        ('Example: {"possible_diseases": ["疾病1", "疾病2"]}\nAnswer: {"possible_diseases": ["B", "A"]}', ["B", "A"]),
        # a later mention without ":" is prose, not a key
        ('{"possible_diseases": ["A"]} (the possible_diseases list above)', ["A"]),
        ('<think>{"possible_diseases": ["X"]}</think>\n{"possible_diseases": ["A"]}', ["A"]),
        ('reasoning only here</think>{"possible_diseases": ["A"]}', ["A"]),
        ('{"possible_diseases": ["A", "B"]', ["A", "B"]),  # the object's closing brace is not needed
    ],
)
def test_parses_the_ranking(completion, items):
    assert parse_ranking(completion) == (items, None)


@pytest.mark.parametrize(
    "completion, reason",
    [
        ("", NO_JSON),
        ("The most likely disease is A.", NO_JSON),
        ('["A", "B"]', NO_JSON),  # a bare list is not the requested format
        ('<think>{"possible_diseases": ["A"]}', UNCLOSED_THINK),
        ('{"possible_diseases": "A"}', NO_LIST),
        ('{"possible_diseases": null}', NO_LIST),
        ('{"possible_diseases": [1, 2]}', WRONG_TYPES),
        ('{"possible_diseases": [["A"]]}', WRONG_TYPES),
        ('{"possible_diseases": ["A", B]}', WRONG_TYPES),
        ('{"possible_diseases": ["A", "B"', WRONG_TYPES),  # cut off
        ('{"possible_diseases": ["A]}', WRONG_TYPES),
        ('{"possible_diseases": ["A"]}\n{"possible_diseases": [', WRONG_TYPES),  # the last one counts, even broken
    ],
)
def test_failures_give_a_reason(completion, reason):
    assert parse_ranking(completion) == (None, reason)


def test_strip_thinking():
    assert strip_thinking("a<think>b</think>c</think>d") == "d"
    assert strip_thinking("plain") == "plain"
    assert strip_thinking("<think>open") is None


def test_list_length_is_bounded():
    ok = '{"possible_diseases": [' + ", ".join(['"a"'] * MAX_ITEMS) + "]}"
    too_long = '{"possible_diseases": [' + ", ".join(['"a"'] * (MAX_ITEMS + 1)) + "]}"
    assert len(parse_ranking(ok)[0]) == MAX_ITEMS
    assert parse_ranking(too_long) == (None, WRONG_TYPES)
