"""``npu-rft train`` and ``npu-rft export`` through click: options, --set, --resume, errors."""
from __future__ import annotations

import yaml
from click.testing import CliRunner
from helpers import example_rows, tiny_train_config, write_jsonl

from npu_rft.cli import cli, main


def _config(tmp_path, tiny_model_dir, **overrides):
    train = write_jsonl(tmp_path / "train.jsonl", example_rows(6))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(tiny_model_dir, train, tmp_path / "run", overrides=overrides)))
    return path


def test_train_then_resume_for_more_steps(tmp_path, tiny_model_dir):
    path = _config(tmp_path, tiny_model_dir)
    runner = CliRunner()
    first = runner.invoke(cli, ["train", "--config", str(path), "--set", "schedule.steps=1"])
    assert first.exit_code == 0, first.output
    assert "completed: 1 steps" in first.output
    again = runner.invoke(cli, ["train", "--config", str(path), "--set", "schedule.steps=1"])
    assert again.exit_code == 1 and "already holds a run" in again.output
    resumed = runner.invoke(cli, ["train", "--config", str(path), "--set", "schedule.steps=2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "completed: 2 steps" in resumed.output
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()
    exported = runner.invoke(cli, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "adapter")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_config_errors_are_reported_with_every_problem(tmp_path, tiny_model_dir, capsys):
    path = _config(tmp_path, tiny_model_dir)
    code = main(["train", "--config", str(path), "--set", "optim.learning_rate=1", "--set", "grpo.beta=-1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "optim.learning_rate: unknown key" in err and "grpo.beta=-1" in err


def test_resume_without_a_checkpoint_says_so(tmp_path, tiny_model_dir, capsys):
    path = _config(tmp_path, tiny_model_dir)
    assert main(["train", "--config", str(path), "--resume"]) == 1
    assert "no checkpoint under" in capsys.readouterr().err
