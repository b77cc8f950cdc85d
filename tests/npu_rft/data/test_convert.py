import dataclasses
import json
from pathlib import Path

import pytest

from npu_rft.data.convert import ConvertOptions, InvalidRowsError, convert, dedupe_candidates
from npu_rft.data.schema import DataError, normalize, read_examples
from npu_rft.data.templates import DEFAULT_SYSTEM, builtin_template

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"

# The published DxBench example and the training row built from it (../shared/reference).
REFERENCE_CASE = {
    "id": "example_1",
    "department": "儿科",
    "explicit_symptoms": [["呕吐", "True"]],
    "implicit_symptoms": [["哭声评分减分", "True"], ["喂养困难", "True"], ["腹部不适", "False"]],
    "candidate_diseases": ["新生儿呕吐", "进食障碍", "消化不良"],
    "disease": "新生儿呕吐",
}
REFERENCE_ROW = {
    "system": "你是一个擅长于文章写作、文本分析、代码编写、数学运算、逻辑推理的AI助手,专注于针对用户的问题给出高质量解答。",
    "context": "你是一位经验丰富的医生。请基于患者的症状信息,对候选疾病进行可能性排序。\n\n输入信息包括:\n1.显性症状列表:[['呕吐', 'True']]\n2.隐性症状列表:[['哭声评分减分', 'True'], ['喂养困难', 'True'], ['腹部不适', 'False']]\n3.候选疾病列表:['新生儿呕吐', '进食障碍', '消化不良']\n\n请按照以下步骤进行分析:\n1.综合分析所有症状信息\n2.对每个候选疾病评估其与症状的匹配程度\n3.基于症状表现的典型性和特异性进行排序\n4.将疾病按可能性从高到低排序,并以json格式输出最终的排序列表\n\n示例输出:\n{\n \"possible_diseases\": [\"疾病1\", \"疾病2\", \"疾病3\"]\n}\n\n请基于以上标准对该患者的候选疾病进行分析并给出排序结果。",
    "target": "新生儿呕吐",
}


def rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def write_json(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def test_reference_case_gives_the_published_row(tmp_path):
    for name, text in [("ref.json", json.dumps([REFERENCE_CASE], ensure_ascii=False, indent=1)),
                       ("ref.jsonl", json.dumps(REFERENCE_CASE, ensure_ascii=False))]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        convert(tmp_path / name, output=tmp_path / "out.jsonl")
        (row,) = rows(tmp_path / "out.jsonl")
        assert {k: row[k] for k in ("system", "context", "target")} == REFERENCE_ROW
        assert row["meta"] == {"id": "example_1", "candidates": REFERENCE_CASE["candidate_diseases"],
                               "department": "儿科", "source": name}


def test_reference_file_when_present(tmp_path):
    reference = SHARED_DATA.parent / "reference" / "dxbench_prompt_example.json"
    if not reference.is_file():
        pytest.skip("../shared/reference is not present")
    published = json.loads(reference.read_text(encoding="utf-8"))
    convert(write_json(tmp_path / "in.json", [published["dxbench_case"]]), output=tmp_path / "o.jsonl", options=ConvertOptions(meta=False))
    assert rows(tmp_path / "o.jsonl") == [published["published_training_row"]]


def test_sample_with_3_4_5_candidates_and_duplicates(tmp_path):
    summary = convert(FIXTURES / "dxbench_sample.json", out_dir=tmp_path, options=ConvertOptions(lang="en"))
    out = {row["meta"]["id"]: row for row in rows(tmp_path / "data.jsonl")}
    assert list(out) == ["sample_3", "sample_4", "sample_5", "sample_dup", "sample_zh", "sample_1"]
    assert out["sample_4"]["meta"]["candidates"] == ["Common cold", "Bronchitis", "Pneumonia", "Tuberculosis"]
    assert "Candidate diseases: ['Common cold', 'Bronchitis', 'Pneumonia', 'Tuberculosis']" in out["sample_4"]["context"]
    # a name with an apostrophe is written the way Python writes it
    assert "['Essential tremor', 'Multiple sclerosis', \"Parkinson's disease\", 'Stroke', \"Wilson's disease\"]" in out["sample_5"]["context"]
    assert out["sample_dup"]["meta"]["candidates"] == ["Migraine", "Tension headache", "Cluster headache"]
    assert out["sample_1"]["target"] == "eczema" and out["sample_1"]["meta"]["candidates"] == ["Eczema"]
    for row in out.values():
        assert row["system"] == DEFAULT_SYSTEM["en"]
        assert normalize(row["target"]) in map(normalize, row["meta"]["candidates"])
    assert (summary.rows_in, summary.rows_out, summary.rows_rejected) == (6, 6, 0)
    assert summary.duplicate_candidate_cases == 1
    assert summary.candidate_counts == {1: 1, 3: 3, 4: 1, 5: 1}
    # targets at 2 (sample_3), 4, 3, 3 (sample_dup after dedupe), 1, 1
    assert summary.answer_positions == {1: 2, 2: 1, 3: 2, 4: 1}
    assert summary.expected_positions[1] == pytest.approx(1 + 3 / 3 + 1 / 4 + 1 / 5)
    assert summary.skew_warning() is None  # six rows: not enough to call it skewed
    read_examples(tmp_path / "data.jsonl")  # the output is valid input


def test_dedupe_keeps_first_spelling():
    assert dedupe_candidates(["Flu", " flu", "ＦＬＵ", "Cold"]) == (["Flu", "Cold"], True)
    assert dedupe_candidates(["a", "b"]) == (["a", "b"], False)


def test_split_is_deterministic_and_disjoint(tmp_path):
    cases = [dict(REFERENCE_CASE, id=f"c{i}") for i in range(20)]
    source = write_json(tmp_path / "in.json", cases)
    convert(source, out_dir=tmp_path / "a", options=ConvertOptions(train_size=14, seed=3))
    convert(source, out_dir=tmp_path / "b", options=ConvertOptions(train_size=14, seed=3))
    convert(source, out_dir=tmp_path / "c", options=ConvertOptions(train_size=0.7, seed=4))
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = [r["meta"]["id"] for r in rows(tmp_path / "a" / "train.jsonl")]
    held = [r["meta"]["id"] for r in rows(tmp_path / "a" / "eval.jsonl")]
    assert (len(train), len(held)) == (14, 6)
    assert sorted(train + held, key=lambda s: int(s[1:])) == [c["id"] for c in cases]
    assert train == sorted(train, key=lambda s: int(s[1:]))  # each file keeps the input order
    other = [r["meta"]["id"] for r in rows(tmp_path / "c" / "train.jsonl")]
    assert len(other) == 14 and other != train  # another seed, another split
    with pytest.raises(DataError, match="both train and eval need at least one row"):
        convert(source, out_dir=tmp_path / "d", options=ConvertOptions(train_size=20))


def test_shuffle_is_seeded_per_case_and_keeps_meta_in_prompt_order(tmp_path):
    cases = [dict(REFERENCE_CASE, id=f"c{i}") for i in range(30)]
    source = write_json(tmp_path / "in.json", cases)
    options = ConvertOptions(shuffle_candidates=True, seed=1)
    convert(source, output=tmp_path / "a.jsonl", options=options)
    convert(source, output=tmp_path / "b.jsonl", options=options)
    first = rows(tmp_path / "a.jsonl")
    assert first == rows(tmp_path / "b.jsonl")
    orders = {tuple(r["meta"]["candidates"]) for r in first}
    assert len(orders) > 1 and all(sorted(o) == sorted(REFERENCE_CASE["candidate_diseases"]) for o in orders)
    for row in first:
        assert f"3.候选疾病列表:{row['meta']['candidates']!r}\n" in row["context"]
    # a case's order depends on the seed and its id only, not on the other rows
    convert(write_json(tmp_path / "one.json", [cases[7]]), output=tmp_path / "c.jsonl", options=options)
    assert rows(tmp_path / "c.jsonl")[0]["meta"]["candidates"] == first[7]["meta"]["candidates"]


def test_no_meta_writes_three_keys_and_system_override(tmp_path):
    convert(write_json(tmp_path / "in.json", [REFERENCE_CASE]), output=tmp_path / "o.jsonl",
            options=ConvertOptions(meta=False, system="Be brief."))
    assert rows(tmp_path / "o.jsonl") == [{**REFERENCE_ROW, "system": "Be brief."}]


def test_broken_rows_fail_with_locations_and_write_nothing(tmp_path):
    source = FIXTURES / "dxbench_broken.jsonl"
    with pytest.raises(InvalidRowsError) as info:
        convert(source, out_dir=tmp_path / "out")
    bad_lines = [int(p.split(":")[1]) for p in info.value.problems]
    assert bad_lines == [2, 3, 5, 6, 7, 8, 9, 12]
    assert f"{source}:9: duplicate id 'broken_1' (first at {source}:1)" in info.value.problems[6]
    assert not (tmp_path / "out").exists()


def test_skip_invalid_writes_good_rows_and_exactly_the_rejects(tmp_path):
    source = FIXTURES / "dxbench_broken.jsonl"
    summary = convert(source, out_dir=tmp_path, options=ConvertOptions(skip_invalid=True))
    assert [r["meta"]["id"] for r in rows(tmp_path / "data.jsonl")] == ["broken_1", "broken_4", "broken_10", "13"]
    rejects = rows(tmp_path / "rejects.jsonl")
    assert [r["location"] for r in rejects] == [f"{source}:{n}" for n in (2, 3, 5, 6, 7, 8, 9, 12)]
    raw_lines = source.read_bytes().splitlines()
    assert rejects[0]["row"] == raw_lines[1].decode()  # invalid JSON: the line as text
    assert rejects[2]["row"] == json.loads(raw_lines[4]) and "'Stroke' is not among the candidates" in rejects[2]["reason"]
    assert rejects[5]["row"].startswith('{"id": "broken_8"') and "\\xff" in rejects[5]["row"]
    assert (summary.rows_in, summary.rows_out, summary.rows_rejected) == (12, 4, 8)
    assert summary.candidate_counts == {4: 3, 5: 1}


def test_array_syntax_error_stops_with_its_line(tmp_path):
    source = tmp_path / "bad.json"
    source.write_text('[\n {"id": 1},\n {"id": 2,,}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{source}:3: invalid JSON"):
        convert(source, out_dir=tmp_path / "o", options=ConvertOptions(skip_invalid=True))
    source.write_bytes(b'[\n {"id": "\xff"}\n]')
    with pytest.raises(DataError, match=rf"{source}:2: not valid UTF-8"):
        convert(source, out_dir=tmp_path / "o")


def test_array_rows_report_their_start_line(tmp_path):
    source = write_json(tmp_path / "in.json", [REFERENCE_CASE, dict(REFERENCE_CASE, id="x", disease="??")])
    with pytest.raises(InvalidRowsError) as info:
        convert(source, out_dir=tmp_path / "o")
    start = source.read_text(encoding="utf-8").splitlines().index("  {", 2) + 1
    assert info.value.problems[0].startswith(f"{source}:{start}: target '??'")


def test_jsonl_field_mapping_and_template(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text(
        '{"question": "2+2?", "answer": "4", "options": ["3", "4", "4 "], "uid": 1}\n'
        '{"question": "Capital of France?", "answer": "Paris"}\n',
        encoding="utf-8",
    )
    options = ConvertOptions(format="jsonl", fields={"context": "question", "target": "answer", "candidates": "options", "id": "uid"})
    summary = convert(source, output=tmp_path / "o.jsonl", options=options)
    first, second = rows(tmp_path / "o.jsonl")
    assert first == {"system": "", "context": "2+2?", "target": "4", "meta": {"id": "1", "candidates": ["3", "4"], "source": "qa.jsonl"}}
    assert second["meta"] == {"id": f"{source}:2", "source": "qa.jsonl"}
    assert summary.duplicate_candidate_cases == 1 and summary.candidate_counts == {2: 1}

    template = tmp_path / "t.txt"
    template.write_text("Q: {question} Options: {options} {{json}}\n", encoding="utf-8")
    options = ConvertOptions(format="jsonl", template=str(template), fields={"target": "answer"})
    with pytest.raises(InvalidRowsError, match=rf"{source}:2: template .* uses \{{options\}}, but this row has no 'options' field"):
        convert(source, output=tmp_path / "t.jsonl", options=options)
    convert(source, output=tmp_path / "t.jsonl", options=dataclasses.replace(options, skip_invalid=True))
    assert [r["context"] for r in rows(tmp_path / "t.jsonl")] == ["Q: 2+2? Options: ['3', '4', '4 '] {json}"]


def test_jsonl_missing_mapped_field(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text('{"question": "q", "answer": 4}\n', encoding="utf-8")
    with pytest.raises(InvalidRowsError, match=rf"{source}:1: field 'answer' must be a string, got int 4"):
        convert(source, output=tmp_path / "o.jsonl", options=ConvertOptions(format="jsonl", fields={"context": "question", "target": "answer"}))


def test_dxbench_template_with_unknown_placeholder(tmp_path):
    template = tmp_path / "t.txt"
    template.write_text("{symptoms}", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown placeholder\(s\) \{symptoms\}"):
        convert(write_json(tmp_path / "in.json", [REFERENCE_CASE]), output=tmp_path / "o.jsonl", options=ConvertOptions(template=str(template)))


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "p1", "label": "a"}, {"prompt": "p2", "label": "b"}]).save_to_disk(str(tmp_path / "ds"))
    convert(tmp_path / "ds", output=tmp_path / "o.jsonl", options=ConvertOptions(format="hf", fields={"context": "prompt", "target": "label"}))
    assert [(r["context"], r["target"], r["meta"]["id"]) for r in rows(tmp_path / "o.jsonl")] == [
        ("p1", "a", f"{tmp_path / 'ds'}[0]"), ("p2", "b", f"{tmp_path / 'ds'}[1]")]


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "csv"}, "format 'csv' is unknown; choose one of dxbench, hf, jsonl"),
    ({"lang": "fr"}, "lang 'fr' is unknown"),
    ({"format": "jsonl", "fields": {"answer": "x"}}, "cannot map field(s) answer"),
    ({"fields": {"target": "x"}}, "field mapping applies to the jsonl and hf formats"),
    ({"train_size": 0}, "neither a row count"),
    ({"train_size": 1.5}, "neither a row count"),
])
def test_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ConvertOptions(**kwargs)


@pytest.mark.parametrize("name, duplicates, first", [("DxBench_zh.json", 0, 630), ("DxBench_en.json", 85, 643)])
def test_real_dxbench_when_present(tmp_path, name, duplicates, first):
    source = SHARED_DATA / name
    if not source.is_file():
        pytest.skip(f"{source} is not present")
    lang = "zh" if name.endswith("zh.json") else "en"
    options = ConvertOptions(train_size=800, seed=0, lang=lang)
    summary = convert(source, out_dir=tmp_path / "a", options=options)
    assert summary.outputs == {str(tmp_path / "a" / "train.jsonl"): 800, str(tmp_path / "a" / "eval.jsonl"): 348}
    assert summary.duplicate_candidate_cases == duplicates and summary.answer_positions[1] == first
    assert summary.skew_warning() is not None
    template = builtin_template(lang)
    cases = {case["id"]: case for case in json.loads(source.read_text(encoding="utf-8"))}
    for row in rows(tmp_path / "a" / "train.jsonl") + rows(tmp_path / "a" / "eval.jsonl"):
        case = cases[row["meta"]["id"]]
        assert row["target"] == case["disease"]
        assert normalize(row["target"]) in map(normalize, row["meta"]["candidates"])
        assert row["context"] == template.render({
            "explicit_symptoms": repr(case["explicit_symptoms"]),
            "implicit_symptoms": repr(case["implicit_symptoms"]),
            "candidates": repr(row["meta"]["candidates"]),
        })
    convert(source, out_dir=tmp_path / "b", options=options)
    for part in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes()
    shuffled = convert(source, out_dir=tmp_path / "c", options=ConvertOptions(train_size=800, lang=lang, shuffle_candidates=True))
    assert shuffled.skew_warning() is None


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"id": ""}, "field 'id' must be a non-empty string or an integer"),
        ({"disease": None}, "missing field(s) 'disease'; a DxBench case needs disease, candidate_diseases"),
        ({"id": 1.5}, "field 'id' must be a non-empty string or an integer"),
        ({"disease": 3}, "field 'disease' must be a string, got int 3"),
        ({"department": ""}, "field 'department' is empty"),
        ({"explicit_symptoms": "呕吐"}, "field 'explicit_symptoms' must be a list of [name"),
        ({"implicit_symptoms": [["喂养困难", True]]}, "['喂养困难', True] is not a [name, \"True\"|\"False\"] pair"),
        ({"candidate_diseases": ["新生儿呕吐", ""]}, "field 'candidate_diseases' must hold non-empty strings"),
    ],
)
def test_dxbench_field_checks(tmp_path, change, reason):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(dict(REFERENCE_CASE, **change), ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(InvalidRowsError) as info:
        convert(source, output=tmp_path / "o.jsonl")
    assert info.value.problems[0].startswith(f"{source}:1: ")
    assert reason in info.value.problems[0]


# ---------------------------------------------------------------- DxBench-format files without department

# Synthetic cases in the DxBench format with no department field, as other
# diagnosis sets publish them: 4 and 5 candidates.
NO_DEPARTMENT = [
    {"id": "nd_4", "explicit_symptoms": [["Cough", "True"]], "implicit_symptoms": [["Fever", "False"]],
     "candidate_diseases": ["Common cold", "Bronchitis", "Pneumonia", "Asthma"], "disease": "Bronchitis"},
    {"id": "nd_5", "explicit_symptoms": [["Itching", "True"], ["Rash", "True"]], "implicit_symptoms": [],
     "candidate_diseases": ["Eczema", "Psoriasis", "Scabies", "Urticaria", "Contact dermatitis"], "disease": "Scabies"},
]


def test_dxbench_format_without_department_converts(tmp_path):
    source = write_json(tmp_path / "other.json", NO_DEPARTMENT)
    summary = convert(source, output=tmp_path / "o.jsonl", options=ConvertOptions(lang="en"))
    out = rows(tmp_path / "o.jsonl")
    assert [r["meta"] for r in out] == [
        {"id": case["id"], "candidates": case["candidate_diseases"], "source": "other.json"} for case in NO_DEPARTMENT]
    template = builtin_template("en")
    for row, case in zip(out, NO_DEPARTMENT):
        assert row["target"] == case["disease"]
        assert row["context"] == template.render({
            "explicit_symptoms": repr(case["explicit_symptoms"]), "implicit_symptoms": repr(case["implicit_symptoms"]),
            "candidates": repr(case["candidate_diseases"])})
    assert summary.candidate_counts == {4: 1, 5: 1} and summary.answer_positions == {2: 1, 3: 1}
    assert [ex.meta for ex in read_examples(tmp_path / "o.jsonl")] == [r["meta"] for r in out]


def test_dxbench_format_needs_only_what_the_prompt_and_grader_use(tmp_path):
    case = {k: v for k, v in NO_DEPARTMENT[0].items() if k not in ("id", "implicit_symptoms")}
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(case) + "\n", encoding="utf-8")
    # The built-in template shows both symptom lists: the row names the missing one.
    with pytest.raises(InvalidRowsError) as info:
        convert(source, output=tmp_path / "o.jsonl")
    assert info.value.problems == [
        f"{source}:1: template {builtin_template('zh').name} uses {{implicit_symptoms}}, but this row has no 'implicit_symptoms' "
        "field; add the field to the row or remove the placeholder"]
    # A template without it converts the row; with no id, the location is the id.
    template = tmp_path / "t.txt"
    template.write_text("Symptoms: {explicit_symptoms}\nRank: {candidates}\n", encoding="utf-8")
    convert(source, output=tmp_path / "o.jsonl", options=ConvertOptions(template=str(template)))
    (row,) = rows(tmp_path / "o.jsonl")
    assert row["context"] == "Symptoms: [['Cough', 'True']]\nRank: ['Common cold', 'Bronchitis', 'Pneumonia', 'Asthma']"
    assert row["meta"] == {"id": f"{source}:1", "candidates": case["candidate_diseases"], "source": "in.jsonl"}
    # The grader's fields are always required.
    source.write_text(json.dumps({"explicit_symptoms": [], "disease": "Asthma"}) + "\n", encoding="utf-8")
    with pytest.raises(InvalidRowsError, match=rf"{source}:1: missing field\(s\) 'candidate_diseases'; a DxBench case needs"):
        convert(source, output=tmp_path / "o.jsonl", options=ConvertOptions(template=str(template)))


def test_department_placeholder_on_a_row_without_one_is_a_row_error(tmp_path):
    source = tmp_path / "mixed.jsonl"
    cases = [dict(NO_DEPARTMENT[0], department="Respiratory"), NO_DEPARTMENT[1]]
    source.write_text("".join(json.dumps(c) + "\n" for c in cases), encoding="utf-8")
    template = tmp_path / "dep.txt"
    template.write_text("Department: {department}\nSymptoms: {explicit_symptoms}\nCandidates: {candidates}", encoding="utf-8")
    options = ConvertOptions(template=str(template))
    with pytest.raises(InvalidRowsError) as info:
        convert(source, out_dir=tmp_path / "out", options=options)
    assert info.value.problems == [
        f"{source}:2: template {template} uses {{department}}, but this row has no 'department' field; "
        "add the field to the row or remove the placeholder"]
    assert not (tmp_path / "out").exists()
    summary = convert(source, out_dir=tmp_path / "out", options=dataclasses.replace(options, skip_invalid=True))
    (row,) = rows(tmp_path / "out" / "data.jsonl")
    assert row["context"].startswith("Department: Respiratory\n") and row["meta"]["department"] == "Respiratory"
    assert [r["location"] for r in rows(tmp_path / "out" / "rejects.jsonl")] == [f"{source}:2"]
    assert (summary.rows_out, summary.rows_rejected) == (1, 1)


@pytest.mark.parametrize("name, lang", [("DxBench_zh.json", "zh"), ("DxBench_en.json", "en")])
def test_real_dxbench_without_department_when_present(tmp_path, name, lang):
    """The real file with every department removed converts to the same rows, less meta.department."""
    source = SHARED_DATA / name
    if not source.is_file():
        pytest.skip(f"{source} is not present")
    cases = json.loads(source.read_text(encoding="utf-8"))
    stripped = write_json(tmp_path / name, [{k: v for k, v in c.items() if k != "department"} for c in cases])
    convert(source, output=tmp_path / "with.jsonl", options=ConvertOptions(lang=lang))
    convert(stripped, output=tmp_path / "without.jsonl", options=ConvertOptions(lang=lang))
    expected = rows(tmp_path / "with.jsonl")
    for row in expected:
        del row["meta"]["department"]
    assert rows(tmp_path / "without.jsonl") == expected and len(expected) == len(cases)
