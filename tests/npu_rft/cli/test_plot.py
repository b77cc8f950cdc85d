"""Tests for ``npu-rft plot`` through click's CliRunner."""
from __future__ import annotations

import json

from click.testing import CliRunner

from npu_rft.cli import cli


def test_plot_command_writes_the_png_and_prints_its_path(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    result = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("curves.png")
    assert (tmp_path / "curves.png").is_file()


def test_plot_command_reports_a_missing_metrics_file(tmp_path):
    result = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert result.exit_code == 1
    assert "metrics.jsonl: not found" in result.output
