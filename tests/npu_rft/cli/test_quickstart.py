"""``npu-rft quickstart --smoke`` through click's CliRunner."""
from __future__ import annotations

from click.testing import CliRunner

from npu_rft.cli import cli


def test_quickstart_smoke_prints_the_before_after_table(tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(cli, ["quickstart", "--smoke", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                                      "--grpo-steps", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| base (warm-up) |" in result.output and "| after GRPO |" in result.output
    assert "| chance |" in result.output
    assert "GRPO: Top@1 on the eval split" in result.output and "iterative DPO" not in result.output
    assert (out / "report.md").is_file() and (out / "grpo" / "curves.png").is_file()
    assert '"grpo_steps": 1' in (out / "quickstart.json").read_text()


def test_quickstart_algorithm_option(tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(cli, ["quickstart", "--smoke", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                                      "--algorithm", "dpo", "--dpo-steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| after iterative DPO |" in result.output and "| after GRPO |" not in result.output
    assert "iterative DPO: Top@1 on the eval split" in result.output
    assert (out / "dpo" / "curves.png").is_file() and not (out / "grpo").exists()
    assert '"dpo_steps": 2' in (out / "quickstart.json").read_text()
    bad = CliRunner().invoke(cli, ["quickstart", "--smoke", "--algorithm", "ppo"])
    assert bad.exit_code == 2 and "'ppo' is not one of 'grpo', 'dpo', 'both'" in bad.output
