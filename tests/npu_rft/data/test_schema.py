import json

import pytest

from npu_rft.data.schema import DataError, Example, normalize, read_completions, read_examples, write_jsonl_atomic


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


ROW = {"system": "s", "context": "c", "target": "Flu", "meta": {"id": "a", "candidates": ["Cold", "flu"]}}


def test_normalize_folds_width_case_and_space():
    assert normalize("  ＦＬＵ ") == "flu"
    assert normalize("Straße") == "strasse"


def test_read_examples_valid_rows(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW), "", json.dumps({"context": "c2", "target": "t2"})])
    first, second = read_examples(path)
    assert (first.system, first.context, first.target, first.id) == ("s", "c", "Flu", "a")
    assert first.location == f"{path}:1"
    assert second.system is None and second.meta == {}
    assert second.id == f"{path}:3"  # no meta.id: the location
    assert first.to_row() == ROW
    assert second.to_row() == {"context": "c2", "target": "t2"}


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"context": "c",', "invalid JSON"),
        ('["c", "t"]', "expected a JSON object, got list"),
        ('{"context": "c"}', "missing field 'target'"),
        ('{"context": "c", "target": 3}', "field 'target' must be a string, got int"),
        ('{"context": " ", "target": "t"}', "field 'context' is empty"),
        ('{"context": "c", "target": "t", "answer": 1}', "unknown field(s) 'answer'"),
        ('{"context": "c", "target": "t", "system": 1}', "'system' must be a string or null"),
        ('{"context": "c", "target": "t", "meta": []}', "'meta' must be an object"),
        ('{"context": "c", "target": "t", "meta": {"id": 1.5}}', "meta.id must be a string or an integer"),
        ('{"context": "c", "target": "t", "meta": {"candidates": []}}', "meta.candidates must be a non-empty list"),
        ('{"context": "c", "target": "t", "meta": {"candidates": ["x"]}}', "target 't' is not among meta.candidates"),
        ('{"text": "raw"}', "plain-text rows"),
    ],
)
def test_read_examples_reports_path_line_reason(tmp_path, line, reason):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW), line])
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert reason in str(info.value)


def test_read_examples_bad_encoding_and_duplicate_ids(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW), b'{"context": "\xff", "target": "t"}', json.dumps(ROW)])
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert info.value.problems == [
        f"{path}:2: not valid UTF-8 (byte 0xff at column 14); save the file as UTF-8",
        f"{path}:3: duplicate meta.id 'a' (first at {path}:1); ids must be unique",
    ]


def test_many_problems_show_the_first_and_count_the_rest(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["{bad"] * 13)
    with pytest.raises(DataError) as info:
        read_examples(path)
    message = str(info.value)
    assert message.splitlines()[0] == "13 problems:"
    assert f"{path}:10: invalid JSON" in message and f"{path}:11:" not in message
    assert message.splitlines()[-1] == "... and 3 more problem(s)"


def test_text_rows_only_when_allowed(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "hello world"}'])
    (example,) = read_examples(path, allow_text=True)
    assert example.text == "hello world" and example.to_row() == {"text": "hello world"}


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no rows"):
        read_examples(write_lines(tmp_path / "e.jsonl", [""]))


def test_example_meta_must_be_json_serialisable():
    with pytest.raises(ValueError, match="JSON-serialisable"):
        Example("c", "t", meta={"when": object()})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        Example("c", "t", meta={"x": float("nan")})


def test_write_jsonl_atomic_roundtrip_and_no_partial_file(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    assert write_jsonl_atomic(path, [ROW, {"context": "中文", "target": "t"}]) == 2
    assert path.read_text(encoding="utf-8").splitlines()[1] == '{"context": "中文", "target": "t"}'

    def failing():
        yield ROW
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, failing())
    assert len(path.read_text().splitlines()) == 2  # the old file is untouched
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # no temporary left


def test_read_completions_by_id_and_by_position(tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW), json.dumps({**ROW, "meta": {"id": 7}})])
    examples = read_examples(data)
    by_id = write_lines(tmp_path / "c.jsonl", ['{"id": 7, "completion": "x"}', '{"id": "a", "completion": "y"}', '{"id": "a", "completion": "z"}'])
    assert [(ex.id, c) for ex, c in read_completions(by_id, examples)] == [("7", "x"), ("a", "y"), ("a", "z")]
    by_pos = write_lines(tmp_path / "p.jsonl", ['{"completion": "x"}', '{"completion": "y"}'])
    assert [(ex.id, c) for ex, c in read_completions(by_pos, examples)] == [("a", "x"), ("7", "y")]


def test_read_completions_errors(tmp_path):
    examples = read_examples(write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)]))
    bad = write_lines(tmp_path / "c.jsonl", ['{"id": "zz", "completion": "x"}', '{"completion": 1}'])
    with pytest.raises(DataError) as info:
        read_completions(bad, examples)
    assert info.value.problems[:2] == [
        f"{bad}:1: id 'zz' is not in the data file",
        f'{bad}:2: expected {{"completion": "...", "id": ...}} with a string completion',
    ]
    too_many = write_lines(tmp_path / "m.jsonl", ['{"completion": "x"}', '{"completion": "y"}'])
    with pytest.raises(DataError, match="2 completions for 1 data rows"):
        read_completions(too_many, examples)
