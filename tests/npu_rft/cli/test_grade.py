"""``npu-rft grade`` through click's CliRunner."""
import json

from click.testing import CliRunner

from npu_rft.cli import cli

ROWS = [
    {"system": "", "context": "c1", "target": "Flu", "meta": {"id": "a", "candidates": ["Flu", "Cold", "Covid"]}},
    {"system": "", "context": "c2", "target": "Cold", "meta": {"id": "b", "candidates": ["Flu", "Cold", "Covid"]}},
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_mean_score_and_format_failures(tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS)
    preds = write(tmp_path / "p.jsonl", [
        {"id": "a", "completion": '{"possible_diseases": ["Flu", "Cold", "Covid"]}'},  # 1.0
        {"id": "b", "completion": '{"possible_diseases": ["Flu", "Cold", "Covid"]}'},  # 0.5
        {"id": "b", "completion": "I am not sure."},  # 0, format failure
        {"id": "a", "completion": "<think>Flu</think>```json\n{'possible_diseases': ['Cold', 'Flu']}\n```"},  # 0.5
    ])
    result = CliRunner().invoke(cli, ["grade", "--data", data, "--completions", preds])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["completions: 4", "inverse_rank: mean 0.5000, format failures 25.00%"]

    result = CliRunner().invoke(cli, ["grade", "--data", data, "--completions", preds, "--grader", "inverse_rank=3", "--grader", "json_format"])
    assert result.exit_code == 0, result.output
    assert "json_format: mean 0.7500, format failures 25.00%" in result.output
    assert "reward (weighted mean): 0.5625" in result.output  # (3 * 0.5 + 0.75) / 4


def test_errors(tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS)
    preds = write(tmp_path / "p.jsonl", [{"completion": "x"}])
    result = CliRunner().invoke(cli, ["grade", "--data", data, "--completions", preds])
    assert result.exit_code == 1 and "1 completions for 2 data rows" in result.output
    result = CliRunner().invoke(cli, ["grade", "--data", data, "--completions", preds, "--grader", "rank"])
    assert result.exit_code == 2 and "unknown grader 'rank'" in result.output
    no_candidates = write(tmp_path / "n.jsonl", [{"context": "c", "target": "t"}])
    result = CliRunner().invoke(cli, ["grade", "--data", no_candidates, "--completions", preds])
    assert result.exit_code == 1 and f"{no_candidates}:1: this grader needs meta.candidates" in result.output
