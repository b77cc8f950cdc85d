"""``npu-rft convert-data`` through click's CliRunner."""
import json
from pathlib import Path

from click.testing import CliRunner

from npu_rft.cli import cli

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def run(*args):
    return CliRunner().invoke(cli, ["convert-data", *map(str, args)])


def test_split_and_summary(tmp_path):
    result = run("--input", FIXTURES / "dxbench_sample.json", "--out-dir", tmp_path, "--train-size", "4", "--seed", "0", "--lang", "en")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "rows in: 6, out: 6, rejected: 0"
    assert lines[1] == "cases with duplicate candidates (removed, first kept): 1"
    assert lines[2] == "candidates per case: 1: 1, 3: 3, 4: 1, 5: 1"
    # by chance: E_1 = 3/3 + 1/4 + 1/5 + 1/1 = 2.45, E_2 = E_3 = 1.45, E_4 = 0.45, E_5 = 0.2
    assert lines[3] == "answer position: 1: 2 (2.4 by chance), 2: 1 (1.4 by chance), 3: 2 (1.4 by chance), 4: 1 (0.5 by chance)"
    assert lines[4].startswith("prompt length (characters, system + context): min ")
    assert f"wrote 4 rows to {tmp_path / 'train.jsonl'}" in lines
    assert f"wrote 2 rows to {tmp_path / 'eval.jsonl'}" in lines
    assert not any(line.startswith("WARNING") for line in lines)


def test_skew_warning_and_fraction(tmp_path):
    case = json.loads((FIXTURES / "dxbench_sample.json").read_text(encoding="utf-8"))[0]
    case["disease"] = case["candidate_diseases"][0]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(dict(case, id=f"c{i}")) + "\n" for i in range(40)), encoding="utf-8")
    result = run("--input", source, "--out-dir", tmp_path / "o", "--train-size", "0.75")
    assert result.exit_code == 0, result.output
    assert "WARNING: the answer is at position 1 in 40 of 40 rows; a random order would give about 13" in result.output
    assert len((tmp_path / "o" / "train.jsonl").read_text().splitlines()) == 30
    result = run("--input", source, "--out-dir", tmp_path / "s", "--shuffle-candidates")
    assert result.exit_code == 0 and "WARNING" not in result.output


def test_broken_rows_fail_with_lines_and_skip_invalid_writes_rejects(tmp_path):
    source = FIXTURES / "dxbench_broken.jsonl"
    result = run("--input", source, "--out-dir", tmp_path / "out")
    assert result.exit_code == 1
    assert "Error: 8 problems:" in result.output
    assert f"{source}:2: invalid JSON" in result.output and f"{source}:12: expected a JSON object" in result.output
    assert "Nothing was written. Fix these rows, or pass --skip-invalid" in result.output
    assert not (tmp_path / "out").exists()

    result = run("--input", source, "--out-dir", tmp_path / "out", "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "rows in: 12, out: 4, rejected: 8" in result.output
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["location"].rsplit(":", 1)[1] for r in rejects] == ["2", "3", "5", "6", "7", "8", "9", "12"]
    assert all(r["reason"] for r in rejects)


def test_no_meta_output_file_and_field_mapping(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text('{"q": "2+2?", "a": "4", "opts": ["4", "5"]}\n', encoding="utf-8")
    result = run("--format", "jsonl", "--input", source, "--output", tmp_path / "o.jsonl", "--field", "context=q",
                 "--field", "target=a", "--candidates-field", "opts", "--system", "Answer briefly.")
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "o.jsonl").read_text())
    assert row == {"system": "Answer briefly.", "context": "2+2?", "target": "4",
                   "meta": {"id": f"{source}:1", "candidates": ["4", "5"], "source": "qa.jsonl"}}
    result = run("--format", "jsonl", "--input", source, "--output", tmp_path / "s.jsonl", "--field", "context=q",
                 "--field", "target=a", "--no-meta")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s.jsonl").read_text()) == {"system": "", "context": "2+2?", "target": "4"}


def test_template_file(tmp_path):
    template = tmp_path / "t.txt"
    template.write_text("Symptoms {explicit_symptoms}; pick from {candidates}. Reply {{\"possible_diseases\": [...]}}\n", encoding="utf-8")
    result = run("--input", FIXTURES / "dxbench_sample.json", "--output", tmp_path / "o.jsonl", "--template", template)
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["context"] == ("Symptoms [['Headache', 'True'], ['Nausea', 'True']]; pick from "
                                "['Tension headache', 'Migraine', 'Sinusitis']. Reply {\"possible_diseases\": [...]}")


def test_usage_errors(tmp_path):
    source = FIXTURES / "dxbench_sample.json"
    result = run("--input", source)
    assert result.exit_code == 2 and "give exactly one of --out-dir and --output" in result.output
    result = run("--input", source, "--output", tmp_path / "o.jsonl", "--train-size", "3")
    assert result.exit_code == 2 and "use --out-dir instead of --output" in result.output
    result = run("--input", source, "--out-dir", tmp_path, "--train-size", "many")
    assert result.exit_code == 2 and "neither a row count (800) nor a fraction (0.7)" in result.output
    result = run("--input", source, "--out-dir", tmp_path, "--field", "context")
    assert result.exit_code == 2 and "write KEY=NAME" in result.output
    result = run("--input", source, "--out-dir", tmp_path, "--field", "target=x")
    assert result.exit_code == 2 and "field mapping applies to the jsonl and hf formats" in result.output
    result = run("--input", source, "--out-dir", tmp_path, "--train-size", "6")
    assert result.exit_code == 1 and "both train and eval need at least one row" in result.output
