"""Data parallelism through torchrun, on CPU with gloo.

Fed the same fixed rollouts (``fixed_rollout_train.FixedSampler``: completions
depend only on the prompt; rewards from ``helpers:digit_reward``), 2 processes
with the same global batch must take the same parameter update as 1 process,
for GRPO and for iterative DPO; and a 2-process run must resume inside a DPO
iteration and end where the uninterrupted run ends.

AdamW normalises each update by the gradient's running magnitude, so its
first steps hardly depend on the gradient's scale: a world-size factor wrong
in the loss would go unseen. ``optim.eps = 1`` (far above these gradients,
about 1e-3) makes the update about ``lr * gradient``, so a wrong scale shows.

The 2-process runs are real ``torchrun`` launches (fresh processes: spawned,
never forked); the 1-process references run in this process. They run under
``hccl_guard/sitecustomize.py``: every reduction with a dtype HCCL refuses
(float64, bool, unsigned) fails there as it would on a 910B.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import yaml
from safetensors.torch import load_file

from helpers import example_rows, tiny_train_config, write_jsonl
from npu_rft.checkpoint import checkpoint_dir
from npu_rft.config import TrainConfig
from npu_rft.config_base import from_dict

WORKER = Path(__file__).resolve().parent / "fixed_rollout_train.py"
HCCL_GUARD = Path(__file__).resolve().parent / "hccl_guard"
REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-6


def _worker_module():
    spec = importlib.util.spec_from_file_location("fixed_rollout_train", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(model_dir: Path, train: Path, out: Path, algorithm: str, steps: int, checkpointing: bool = False,
            **sections) -> dict:
    overrides = {
        "run": {"output_dir": str(out), "seed": 0, "device": "cpu", "progress_bar": False, "tensorboard": False,
                "log_samples_every": 0},
        "model": {"name_or_path": str(model_dir), "finetune": "lora", "gradient_checkpointing": checkpointing,
                  "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj"]}},
        "rollout": {"num_samples": 4, "max_new_tokens": 5},
        "algorithm": algorithm,
        "optim": {"lr": 0.5, "eps": 1.0, "max_grad_norm": None},
        "schedule": {"steps": steps},
        "batch": {"prompts_per_step": 4, "micro_batch_size": 4},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        **sections,
    }
    cfg = tiny_train_config(model_dir, train, out, overrides=overrides)
    if algorithm != "grpo":
        del cfg["grpo"]
    return cfg


def _run_in_process(cfg: dict, monkeypatch, resume=None) -> None:
    from npu_rft.trainer import fit

    worker = _worker_module()
    monkeypatch.setattr("npu_rft.rollout.make_sampler", lambda model, tok, *a, **k: worker.FixedSampler(tok))
    fit(from_dict(TrainConfig, cfg), resume=resume)


def guarded_env(log: Path) -> dict:
    """The environment of a launch under the HCCL dtype guard, logging its checks to ``log``."""
    path = os.pathsep.join(p for p in (str(HCCL_GUARD), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "NPU_RFT_HCCL_GUARD_LOG": str(log)}


def assert_guard_saw_reductions(log: Path) -> None:
    lines = log.read_text(encoding="utf-8").splitlines()
    pids = {line.split()[0] for line in lines}
    assert len(pids) >= 2, f"the guard saw reductions from {len(pids)} process(es): {lines[:5]}"
    assert {line.split()[2] for line in lines} <= {"int64", "float32", "bfloat16", "float16", "int32"}


def _torchrun(cfg: dict, path: Path, *extra: str, nproc: int = 2, env: Optional[dict] = None,
              fails: bool = False) -> str:
    """Launch; returns the guard's log (``fails``: the launch must fail)."""
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), "train", "--config", str(path), *extra]
    log = path.with_suffix(".guard.log")
    log.write_text("", encoding="utf-8")
    done = subprocess.run(cmd, env={**guarded_env(log), **(env or {})}, capture_output=True, text=True, timeout=300)
    if fails:
        assert done.returncode != 0, f"torchrun should have failed:\n{done.stderr[-3000:]}"
        return log.read_text(encoding="utf-8")
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert_guard_saw_reductions(log)
    return log.read_text(encoding="utf-8")


def _adapter(run_dir: Path, step: int) -> dict:
    return load_file(str(checkpoint_dir(run_dir, step) / "adapter" / "adapter_model.safetensors"))


def _sharded(run_dir: Path, step: int) -> dict:
    """An fsdp2 checkpoint's weights, under the names PEFT gives an adapter's."""
    from npu_rft.sharding import read_sharded

    return {k.replace(".default.", "."): v
            for k, v in read_sharded(checkpoint_dir(run_dir, step) / "sharded").items()}


FSDP2 = {"parallel": {"strategy": "fsdp2"}}


def assert_fsdp2_collectives(guard_log: str) -> None:
    """FSDP2's all-gathers and reduce-scatters went through the guard, in fp32."""
    calls = {tuple(line.split()[1:]) for line in guard_log.splitlines()}
    assert any(name.startswith("all_gather") and dtype == "float32" for name, dtype in calls), sorted(calls)
    assert any(name.startswith("reduce_scatter") and dtype == "float32" for name, dtype in calls), sorted(calls)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", example_rows(8))


def _assert_same_update(one: dict, two: dict) -> None:
    # LoRA's B starts at zero: its size is the size of the updates
    moved = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    assert moved > 1e-3, f"the update is too small ({moved}) for the comparison to mean anything"
    assert _max_diff(one, two) <= TOLERANCE


def test_grpo_two_processes_update_like_one(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """LoRA: 1 process, 2 under ddp and 2 under fsdp2 take the same update."""
    one, two, sharded = tmp_path / "one", tmp_path / "two", tmp_path / "sharded"
    sections = {"grpo": {"beta": 0.04, "aggregation": "token_mean"}}
    _run_in_process(_config(tiny_model_dir, train_file, one, "grpo", 2, **sections), monkeypatch)
    _torchrun(_config(tiny_model_dir, train_file, two, "grpo", 2, **sections), tmp_path / "two.yaml")
    _assert_same_update(_adapter(one, 2), _adapter(two, 2))
    log = _torchrun(_config(tiny_model_dir, train_file, sharded, "grpo", 2, **sections, **FSDP2),
                    tmp_path / "sharded.yaml")
    assert_fsdp2_collectives(log)
    _assert_same_update(_adapter(one, 2), _sharded(sharded, 2))  # the adapter's keys, and only those
    assert _max_diff(_adapter(two, 2), _sharded(sharded, 2)) <= TOLERANCE


def test_dpo_two_processes_update_like_one_and_resume_inside_an_iteration(
    tiny_model_dir, train_file, tmp_path, monkeypatch
):
    # one iteration = 2 prompt batches x 2 epochs = 4 steps; checkpoints at steps 2 and 4
    sections = {"dpo": {"epochs": 2, "batches_per_iteration": 2, "beta": 0.5}}
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"

    def config(out: Path) -> dict:  # with gradient checkpointing under DDP, as the 910B configs run
        return _config(tiny_model_dir, train_file, out, "dpo", 4, checkpointing=True, **sections)

    _run_in_process(config(one), monkeypatch)
    _torchrun(config(two), tmp_path / "two.yaml")
    _assert_same_update(_adapter(one, 4), _adapter(two, 4))
    sharded = tmp_path / "sharded"  # fsdp2, with gradient checkpointing too
    _torchrun({**config(sharded), **FSDP2}, tmp_path / "sharded.yaml")
    _assert_same_update(_adapter(one, 4), _sharded(sharded, 4))
    assert _max_diff(_adapter(two, 4), _sharded(sharded, 4)) <= TOLERANCE

    # a 2-process run stopped after step 2 (inside the iteration) and resumed
    shutil.copytree(two, resumed)
    shutil.rmtree(checkpoint_dir(resumed, 4))
    _torchrun(config(resumed), tmp_path / "resumed.yaml", "--resume")
    assert _max_diff(_adapter(resumed, 4), _adapter(two, 4)) == 0.0
    # each rank's pairs are its own: the checkpoint resumes only with 2 processes
    assert sorted(p.name for p in checkpoint_dir(two, 2).glob("rank_*")) == ["rank_1"]
    shutil.rmtree(checkpoint_dir(resumed, 4))
    with pytest.raises(ValueError, match="written by 2 process"):
        _run_in_process(config(resumed), monkeypatch, "latest")


def test_torchrun_module_launch_with_real_sampling(tiny_model_dir, train_file, tmp_path):
    """The documented launch, ``torchrun ... -m npu_rft train``, on the tiny DPO config."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "npu_rft",
           "train", "--config", str(REPO / "configs" / "tiny" / "dpo_lora_cpu.yaml"),
           "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"data.train={train_file}",
           "--set", f"run.output_dir={out}", "--set", "schedule.steps=2", "--set", "run.progress_bar=false"]
    log = tmp_path / "guard.log"
    done = subprocess.run(cmd, env=guarded_env(log), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert_guard_saw_reductions(log)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # rank 0 logs, once per step
    assert (checkpoint_dir(out, 2) / "rank_1" / "algorithm.safetensors").is_file()


GUARD_PROBE = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
dist.all_reduce(torch.ones(2, dtype=getattr(torch, sys.argv[1])))
print("reduced")
"""


@pytest.mark.parametrize("dtype,refused", [("float64", True), ("bool", True), ("uint8", True),
                                           ("float32", False), ("int64", False)])
def test_the_hccl_guard_refuses_what_hccl_refuses(tmp_path, dtype, refused):
    log = tmp_path / "guard.log"
    done = subprocess.run([sys.executable, "-c", GUARD_PROBE, dtype], env=guarded_env(log), capture_output=True,
                          text=True, timeout=120)
    if refused:
        assert done.returncode != 0 and "Unsupported data type" in done.stderr, done.stderr[-2000:]
    else:
        assert done.returncode == 0 and "reduced" in done.stdout, done.stderr[-2000:]
    assert log.read_text(encoding="utf-8").split()[1:] == ["all_reduce", dtype]
