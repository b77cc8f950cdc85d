import os
import time

import pytest

from npu_rft.data.schema import DataError, Example
from npu_rft.graders import get_grader
from npu_rft.graders.inverse_rank import inverse_rank
from npu_rft.graders.parsing import NO_JSON, NO_LIST, UNCLOSED_THINK, WRONG_TYPES

CANDIDATES = ["Migraine", "Tension headache", "Sinusitis", "Cluster headache"]  # n = 4
EXAMPLE = Example("...", "Sinusitis", meta={"id": "case", "candidates": CANDIDATES})


def ranking(*items):
    return '{"possible_diseases": [' + ", ".join(f'"{i}"' for i in items) + "]}"


# score = 1 - i / (n - 1) with i the target's index in the cleaned list, n = 4
@pytest.mark.parametrize(
    "completion, score, parsed",
    [
        (ranking("Sinusitis", "Migraine", "Tension headache", "Cluster headache"), 1.0, ["sinusitis", "migraine", "tension headache", "cluster headache"]),
        (ranking("Migraine", "Sinusitis", "Tension headache", "Cluster headache"), 2 / 3, ["migraine", "sinusitis", "tension headache", "cluster headache"]),
        (ranking("Cluster headache", "Migraine", "Sinusitis"), 1 / 3, ["cluster headache", "migraine", "sinusitis"]),
        (ranking("Migraine", "Tension headache", "Cluster headache", "Sinusitis"), 0.0, ["migraine", "tension headache", "cluster headache", "sinusitis"]),
        # junk padding is dropped before the index is taken: it cannot help
        (ranking("junk", "more junk", "Migraine", "Sinusitis"), 2 / 3, ["migraine", "sinusitis"]),
        # repeating an answer does not move the target up
        (ranking("Migraine", "Migraine", "migraine ", "Sinusitis", "Sinusitis"), 2 / 3, ["migraine", "sinusitis"]),
        # case and full width are normalised
        (ranking("ＳＩＮＵＳＩＴＩＳ"), 1.0, ["sinusitis"]),
        (ranking(" MIGRAINE", "sinusitis "), 2 / 3, ["migraine", "sinusitis"]),
        # the target missing from the list scores 0, and the format is fine
        (ranking("Migraine", "Tension headache"), 0.0, ["migraine", "tension headache"]),
        (ranking(), 0.0, []),
        # thinking is ignored, only the answer after it counts
        ("<think>" + ranking("Sinusitis") + "</think>\n" + ranking("Migraine", "Sinusitis"), 2 / 3, ["migraine", "sinusitis"]),
        # several objects: the last one counts
        ("Example format: " + ranking("疾病1", "疾病2") + "\nMy answer: " + ranking("Tension headache", "Migraine", "Sinusitis"), 1 / 3, ["tension headache", "migraine", "sinusitis"]),
        (ranking("Sinusitis") + " on reflection " + ranking("Migraine", "Cluster headache", "Sinusitis"), 1 / 3, ["migraine", "cluster headache", "sinusitis"]),
        # python-style single quotes, fenced block, prose around
        ("{'possible_diseases': ['Tension headache', 'Sinusitis']}", 2 / 3, ["tension headache", "sinusitis"]),
        ("Here it is:\n```json\n" + ranking("Sinusitis", "Migraine") + "\n```\nDone.", 1.0, ["sinusitis", "migraine"]),
    ],
)
def test_tricky_completions(completion, score, parsed):
    grade = inverse_rank(completion, EXAMPLE)
    assert grade.score == pytest.approx(score)
    assert grade.parsed == parsed
    assert grade.reason is None


@pytest.mark.parametrize(
    "completion, reason",
    [
        ("It is probably sinusitis.", NO_JSON),
        ("<think>" + ranking("Sinusitis"), UNCLOSED_THINK),
        ('{"possible_diseases": "Sinusitis"}', NO_LIST),
        ('{"possible_diseases": [1, "Sinusitis"]}', WRONG_TYPES),
        ("\x00\xff binary \ud7ff junk {[(", NO_JSON),
    ],
)
def test_unparseable_scores_zero_with_reason(completion, reason):
    grade = inverse_rank(completion, EXAMPLE)
    assert (grade.score, grade.parsed, grade.reason) == (0.0, None, reason)


def test_one_candidate_scores_one_when_named():
    example = Example("...", "eczema", meta={"candidates": ["Eczema"]})
    assert inverse_rank(ranking("junk", "ECZEMA"), example).score == 1.0
    assert inverse_rank(ranking("junk"), example).score == 0.0


def test_n_counts_distinct_candidates():
    example = Example("...", "Flu", meta={"candidates": ["Flu", " flu", "Cold"]})  # n = 2
    assert inverse_rank(ranking("Cold", "Flu"), example).score == 0.0
    assert inverse_rank(ranking("flu", "Cold"), example).score == 1.0


def test_missing_candidates_is_an_error_naming_the_row():
    example = Example("...", "Flu", location="data.jsonl:7")
    with pytest.raises(DataError, match="data.jsonl:7: this grader needs meta.candidates"):
        inverse_rank(ranking("Flu"), example)


def test_registered():
    assert get_grader("inverse_rank") is inverse_rank


HOSTILE = {
    "deep nesting": '{"possible_diseases": ' + "[" * 500_000 + "]" * 500_000,
    "huge list": '{"possible_diseases": [' + ", ".join(['"Sinusitis"'] * 80_000) + "]}",
    "huge unclosed list": "{'possible_diseases': [" + ", ".join(["'a\\'b'"] * 150_000),
    "binary junk": os.urandom(1_000_000).decode("latin-1"),
    "many objects": ranking("Migraine", "Sinusitis") * 20_000,
    "escaped quotes": '{"possible_diseases": ["' + '\\"' * 500_000,
    "braces": "{" * 1_000_000,
    "key without colon": "possible_diseases " * 55_000,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_megabyte_is_fast_and_never_raises(name):
    completion = HOSTILE[name]
    assert len(completion) >= 900_000
    start = time.perf_counter()
    grade = inverse_rank(completion, EXAMPLE)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{name}: {elapsed:.3f} s"  # loose guard; typical times are in docs/graders.md
    assert 0.0 <= grade.score <= 1.0
    if name == "many objects":
        assert grade.score == pytest.approx(2 / 3)
