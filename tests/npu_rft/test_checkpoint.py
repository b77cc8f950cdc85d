"""Checkpoints: atomic layout, retention, resume resolution, and a run killed
with SIGKILL and resumed ending bit-identical to an uninterrupted one."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import yaml
from helpers import SUBPROCESS_PRELUDE, example_rows, run_command, tiny_train_config, write_jsonl
from safetensors.torch import load_file

from npu_rft import checkpoint as ckpt


def _touch_checkpoint(run, step):
    path = ckpt.checkpoint_dir(run, step)
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    return path


def test_retention_keeps_the_last_n_and_the_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _touch_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / ".step_00000006.tmp").mkdir()  # an interrupted write: never listed
    ckpt.prune_checkpoints(tmp_path, keep_last=2, best_step=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000005"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000005"


def test_torn_staging_directories_are_removed_and_checkpoints_kept(tmp_path, caplog):
    complete = _touch_checkpoint(tmp_path, 2)
    (complete / "sharded").mkdir()
    torn = ckpt.staging_dir(tmp_path, 4)  # a save killed after the shards were written
    (torn / "sharded").mkdir()
    (torn / "sharded" / ".metadata").write_bytes(b"x")
    unrelated = tmp_path / "checkpoints" / "notes.step_00000004.txt"
    unrelated.write_text("kept")
    with caplog.at_level("INFO", logger="npu_rft.checkpoint"):
        assert ckpt.remove_torn_staging(tmp_path) == [torn]
    assert not torn.exists()
    assert (complete / "trainer_state.json").is_file() and (complete / "sharded").is_dir()
    assert unrelated.read_text() == "kept"
    assert [r.getMessage() for r in caplog.records] == [
        f"removed a torn checkpoint staging directory (a run was killed while saving): {torn}"]
    assert ckpt.remove_torn_staging(tmp_path) == []
    assert ckpt.remove_torn_staging(tmp_path / "no-run-yet") == []


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume(tmp_path, None) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        ckpt.resolve_resume(tmp_path, "latest")
    first, second = _touch_checkpoint(tmp_path, 1), _touch_checkpoint(tmp_path, 2)
    assert ckpt.resolve_resume(tmp_path, "latest") == second
    assert ckpt.resolve_resume(tmp_path / "elsewhere", str(tmp_path)) == second  # a run directory
    assert ckpt.resolve_resume(tmp_path, str(first)) == first
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_save_and_load_round_trip(tiny_model_dir, tmp_path):
    from npu_rft.algorithms.base import AlgorithmState
    from npu_rft.config import ModelConfig
    from npu_rft.device import get_device
    from npu_rft.model import load_policy
    from npu_rft.trainer import build_optimizer, build_scheduler
    from npu_rft.config import OptimConfig, ScheduleConfig

    device = get_device("cpu")

    def fresh():
        policy = load_policy(ModelConfig(name_or_path=str(tiny_model_dir)), device, need_reference=False)
        opt = build_optimizer(policy.model, OptimConfig(lr=0.1))
        return policy, opt, build_scheduler(opt, 10, ScheduleConfig(steps=10, lr_schedule="cosine"))

    policy, opt, sched = fresh()
    loss = sum(p.sum() ** 2 for p in policy.model.parameters() if p.requires_grad)
    loss.backward()
    opt.step()
    sched.step()
    state = ckpt.TrainerState(step=3, cursor={"epoch": 1, "index": 5}, best_score=0.5, best_step=3)
    algo = AlgorithmState({"pairs": torch.arange(6).reshape(2, 3)}, {"iteration": 2})
    path = ckpt.save_checkpoint(tmp_path, policy=policy, optimizer=opt, scheduler=sched, grad_scaler=None,
                                rng_state=device.rng_state(), state=state, algorithm_state=algo,
                                config={"model": {"name_or_path": str(tiny_model_dir)}}, keep_last=2)
    assert sorted(p.name for p in path.iterdir()) == sorted([
        "adapter", "optimizer.pt", "scheduler.json", "rng.json", "rng.safetensors", "trainer_state.json",
        "algorithm.json", "algorithm.safetensors", "config.yaml"])
    torch.load(path / "optimizer.pt", weights_only=True)  # loadable without unpickling code
    expected_rng = torch.get_rng_state()
    torch.rand(5)

    policy2, opt2, sched2 = fresh()
    loaded = ckpt.load_checkpoint(path, policy=policy2, optimizer=opt2, scheduler=sched2, grad_scaler=None)
    for (name, a), b in zip(policy.model.named_parameters(), policy2.model.parameters()):
        assert torch.equal(a, b), name
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert loaded.state == state
    assert loaded.algorithm_state.meta == {"iteration": 2}
    assert loaded.algorithm_state.tensors["pairs"].tolist() == [[0, 1, 2], [3, 4, 5]]
    device.set_rng_state(loaded.rng_state)
    assert torch.equal(torch.get_rng_state(), expected_rng)


def _train(args, tmp_path, kill_at=None):
    env = {k: v for k, v in os.environ.items() if k != "NPU_RFT_TEST_KILL_AT"}
    if kill_at is not None:
        env["NPU_RFT_TEST_KILL_AT"] = str(kill_at)
    code = SUBPROCESS_PRELUDE + "import sys\nfrom npu_rft.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return run_command([sys.executable, "-c", code, "train", *args], env=env, cwd=tmp_path, timeout=300)


def test_killed_and_resumed_run_is_bit_identical(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", example_rows(10))
    configs = {}
    for name in ("straight", "killed"):
        cfg = tiny_train_config(tiny_model_dir, train, tmp_path / name, overrides={
            "graders": [{"name": "helpers:digit_reward_or_die"}],
            "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "dropout": 0.1,  # dropout: RNG state matters
                                                                    "target_modules": ["q_proj", "v_proj"]}},
            "schedule": {"steps": 4}, "checkpoint": {"every_steps": 1, "keep_last": 10},
        })
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))

    straight = _train(["--config", str(configs["straight"])], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # 2 prompts x 4 samples = 8 grader calls per step: call 17 is step 3's first.
    killed = _train(["--config", str(configs["killed"])], tmp_path, kill_at=17)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert ckpt.latest_checkpoint(tmp_path / "killed").name == "step_00000002"
    torn = ckpt.staging_dir(tmp_path / "killed", 3)  # as a kill inside a save leaves it
    (torn / "trainer_state.json").write_text("{}")
    resumed = _train(["--config", str(configs["killed"]), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not torn.exists()
    assert f"removed a torn checkpoint staging directory (a run was killed while saving): {torn}" in (
        tmp_path / "killed" / "train.log").read_text()

    a = load_file(str(tmp_path / "straight/checkpoints/step_00000004/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed/checkpoints/step_00000004/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("straight", "killed")]
    assert [m["step"] for m in metrics[1]] == [1, 2, 3, 4]
    assert [m["reward/mean"] for m in metrics[0]] == [m["reward/mean"] for m in metrics[1]]
    assert [m["loss"] for m in metrics[0]] == [m["loss"] for m in metrics[1]]
