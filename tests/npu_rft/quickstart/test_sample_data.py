"""Tests for the quickstart's sample generator: DxBench format, determinism, the
uniform answer position, the fact corpus and the leak-free format warm-up."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from npu_rft.quickstart import sample_data as sd


def test_table_shape_and_names_are_single_words_with_no_overlap():
    assert len(sd.DISEASES) == 24
    assert all(len(s) == 3 for s in sd.SYMPTOMS.values())
    names = sd.vocabulary()
    assert len(names) == len(set(names)) == 24 + 72 + len(sd.NOISE)
    assert all(n.isalpha() and n.islower() for n in names)
    # No name inside another, so each stays one token wherever it appears.
    assert not [(a, b) for a in names for b in names if a != b and a in b]


def test_cases_are_dxbench_rows_with_consistent_contents():
    cases = sd.generate_cases(300, seed=3)
    assert [c["id"] for c in cases] == [f"sample_{i}" for i in range(300)]
    for case in cases:
        assert set(case) == {"id", "department", "explicit_symptoms", "implicit_symptoms",
                             "candidate_diseases", "disease"}
        disease, cands = case["disease"], case["candidate_diseases"]
        assert 3 <= len(cands) <= 5 and len(set(cands)) == len(cands) and disease in cands
        assert case["department"] == sd.DEPARTMENT_OF[disease]
        pairs = case["explicit_symptoms"] + case["implicit_symptoms"]
        assert all(isinstance(p, list) and len(p) == 2 and p[1] in ("True", "False") for p in pairs)
        assert 1 <= len(case["explicit_symptoms"]) <= 2
        assert all(flag == "True" for _, flag in case["explicit_symptoms"])
        true = [s for s, flag in pairs if flag == "True"]
        false = [s for s, flag in pairs if flag == "False"]
        # 2 or 3 of the disease's own symptoms; the other positives are noise.
        assert 2 <= len(set(true) & set(sd.SYMPTOMS[disease])) <= 3
        assert set(true) - set(sd.SYMPTOMS[disease]) <= set(sd.NOISE)
        # Negatives never deny the true disease's symptoms.
        assert not set(false) & set(sd.SYMPTOMS[disease])
    assert any(flag == "False" for c in cases for _, flag in c["implicit_symptoms"])
    assert cases == sd.generate_cases(300, seed=3)
    assert cases != sd.generate_cases(300, seed=4)
    with pytest.raises(ValueError, match="at least one"):
        sd.generate_cases(0)


def test_answer_position_and_candidate_count_are_uniform():
    cases = sd.generate_cases(3000, seed=0)
    sizes = Counter(len(c["candidate_diseases"]) for c in cases)
    assert set(sizes) == {3, 4, 5} and all(900 < v < 1100 for v in sizes.values())
    # Relative position of the answer: P(first) = mean of 1/n, about 0.26.
    first = sum(c["candidate_diseases"][0] == c["disease"] for c in cases) / len(cases)
    assert abs(first - (1 / 3 + 1 / 4 + 1 / 5) / 3) < 0.03
    for n in (3, 4, 5):
        positions = Counter(c["candidate_diseases"].index(c["disease"]) for c in cases
                            if len(c["candidate_diseases"]) == n)
        expected = sizes[n] / n
        assert all(abs(positions[p] - expected) < 0.25 * expected for p in range(n))


def test_fact_corpus_states_every_link_and_only_true_ones():
    lines = sd.fact_corpus(seed=0)
    assert len(lines) == 24 * 31 == len(set(lines))
    assert lines == sd.fact_corpus(seed=0) and lines != sd.fact_corpus(seed=1)
    assert "influenza causes fever, chills and myalgia." in lines
    assert "fever is a symptom of influenza." in lines
    for line in lines:
        diseases = [d for d in sd.DISEASES if d in line.split(" ") or f"{d}." in line]
        assert len(diseases) == 1, line
        mentioned = {w.strip(".,") for w in line.split()} & set(s for v in sd.SYMPTOMS.values() for s in v)
        assert mentioned <= set(sd.SYMPTOMS[diseases[0]]), line


def test_format_warmup_takes_candidates_from_another_case_and_random_order():
    cases = sd.mismatched_cases(400, seed=1)
    pool = sd.generate_cases(800, seed=1, id_prefix="format")
    for i, case in enumerate(cases):
        assert case["explicit_symptoms"] == pool[2 * i]["explicit_symptoms"]
        assert case["candidate_diseases"] == pool[2 * i + 1]["candidate_diseases"]
        assert case["disease"] in case["candidate_diseases"]
    # The symptoms' own disease is no likelier to be listed first than chance.
    rows = [{"system": "s", "context": f"c{i}", "target": c["disease"],
             "meta": {"id": c["id"], "candidates": c["candidate_diseases"]}} for i, c in enumerate(cases)]
    out = sd.format_warmup_rows(rows, seed=0)
    assert len(out) == 400
    for row, case in zip(out, cases):
        ranking = json.loads(row["target"])["possible_diseases"]
        assert sorted(ranking) == sorted(case["candidate_diseases"])
        assert set(row) == {"system", "context", "target", "meta"} and row["meta"] == {"id": case["id"]}
    first_is_symptoms_disease = sum(
        json.loads(r["target"])["possible_diseases"][0] == p["disease"]
        for r, p in zip(out, pool[0::2])
    ) / len(out)
    assert first_is_symptoms_disease < 0.12  # the true disease is among another case's candidates rarely
    orders = Counter(tuple(json.loads(r["target"])["possible_diseases"]) == tuple(c["candidate_diseases"])
                     for r, c in zip(out, cases))
    assert orders[True] < 0.3 * len(out)  # not the listed order


def test_answer_json_is_the_prompted_format():
    assert sd.answer_json(["a", "b"]) == '{"possible_diseases": ["a", "b"]}'
