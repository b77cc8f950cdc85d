"""``npu-rft export`` option handling (the export itself: tests/npu_rft/test_export.py)."""
from __future__ import annotations

from click.testing import CliRunner

from npu_rft.cli import cli


def test_export_needs_exactly_one_source(tmp_path):
    result = CliRunner().invoke(cli, ["export", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "exactly one of --run DIR" in result.output


def test_export_of_a_run_without_checkpoints(tmp_path):
    result = CliRunner().invoke(cli, ["export", "--run", str(tmp_path), "--merge", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no checkpoint under" in result.output
