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
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest
import yaml
from safetensors.torch import load_file

from helpers import example_rows, run_command, tiny_train_config, write_jsonl
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
    done = run_command(cmd, env={**guarded_env(log), **(env or {})}, timeout=300)
    path.with_suffix(".stderr").write_text(done.stderr, encoding="utf-8")
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


def per_rank_counts(stderr: str, what: str) -> dict:
    """``{rank: [count, ...]}`` from the worker's ``fixed-rollout rank R <what> N`` lines."""
    counts: dict = {}
    for rank, count in re.findall(rf"fixed-rollout rank (\d+) {re.escape(what)} (\d+)", stderr):
        counts.setdefault(int(rank), []).append(int(count))
    assert sorted(counts) == [0, 1], stderr[-2000:]
    return counts


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
    forwards = per_rank_counts((tmp_path / "sharded.stderr").read_text(), "forwards")
    assert forwards[0] != forwards[1]  # the ranks' rollouts ran different numbers of forwards
    for run in ("two", "sharded"):  # every rank's run destroyed the process group it initialised
        assert per_rank_counts((tmp_path / f"{run}.stderr").read_text(), "process-groups-alive") == {0: [0], 1: [0]}
    # ddp: every rank reads the model; fsdp2: rank 0 alone, rank 1's shards come from it
    assert per_rank_counts((tmp_path / "two.stderr").read_text(), "from-pretrained") == {0: [1], 1: [1]}
    assert per_rank_counts((tmp_path / "sharded.stderr").read_text(), "from-pretrained") == {0: [1], 1: [0]}
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_module_launch_with_real_sampling(tiny_model_dir, train_file, tmp_path, strategy):
    """The documented launch, ``torchrun ... -m npu_rft train``, on the tiny DPO config; under fsdp2
    with CPU offload and an evaluation after each step too (rank 0 evaluates, while every rank holds
    the whole model)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "npu_rft",
           "train", "--config", str(REPO / "configs" / "tiny" / "dpo_lora_cpu.yaml"),
           "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"data.train={train_file}",
           "--set", f"run.output_dir={out}", "--set", "schedule.steps=2", "--set", "run.progress_bar=false",
           "--set", f"parallel.strategy={strategy}"]
    if strategy == "fsdp2":
        cmd += ["--set", "parallel.cpu_offload=true", "--set", f"data.eval={train_file}",
                "--set", "eval.every_steps=1", "--set", "eval.max_examples=3"]
    log = tmp_path / "guard.log"
    done = run_command(cmd, env=guarded_env(log), timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert_guard_saw_reductions(log)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # rank 0 logs, once per step
    assert (checkpoint_dir(out, 2) / "rank_1" / "algorithm.safetensors").is_file()
    if strategy == "fsdp2":
        assert all("eval/top1" in r for r in records)


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
    done = run_command([sys.executable, "-c", GUARD_PROBE, dtype], env=guarded_env(log), timeout=120)
    if refused:
        assert done.returncode != 0 and "Unsupported data type" in done.stderr, done.stderr[-2000:]
    else:
        assert done.returncode == 0 and "reduced" in done.stdout, done.stderr[-2000:]
    assert log.read_text(encoding="utf-8").split()[1:] == ["all_reduce", dtype]


# ----------------------------------------------------------------- full fine-tuning under fsdp2
# One set of runs serves several checks: 1 process, 2 under ddp and 2 under fsdp2, 4 steps each with
# checkpoints at steps 2 and 4. 8 rows at 4 prompts a step make an epoch of 2 steps: the step-2
# checkpoint sits exactly at an epoch boundary.


def _full_config(model_dir: Path, train: Path, out: Path, algorithm: str, **sections) -> dict:
    cfg = _config(model_dir, train, out, algorithm, 4, **sections)
    cfg["model"]["finetune"] = "full"
    del cfg["model"]["lora"]
    cfg["optim"]["lr"] = 0.05
    return cfg


def _full(run_dir: Path, step: int) -> dict:
    return load_file(str(checkpoint_dir(run_dir, step) / "model" / "model.safetensors"))


def _assert_same_full_update(start: dict, one: dict, other: dict) -> None:
    assert one.keys() <= other.keys()  # a tied head is saved once by save_pretrained, under both names in shards
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-3, f"the update is too small ({moved}) for the comparison to mean anything"
    assert _max_diff(one, {k: other[k] for k in one}) <= TOLERANCE


def _records(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_grpo_runs(tiny_model_dir, train_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("full-grpo")
    sections = {"grpo": {"beta": 0.04, "aggregation": "token_mean"}}  # beta > 0: a sharded reference copy

    def config(out: Path, **extra) -> dict:
        return _full_config(tiny_model_dir, train_file, out, "grpo", **sections, **extra)

    with pytest.MonkeyPatch.context() as monkeypatch:
        _run_in_process(config(root / "one"), monkeypatch)
    _torchrun(config(root / "ddp"), root / "ddp.yaml")
    log = _torchrun(config(root / "fsdp2", **FSDP2), root / "fsdp2.yaml")
    assert_fsdp2_collectives(log)
    return {"root": root, "config": config, "one": root / "one", "ddp": root / "ddp", "fsdp2": root / "fsdp2"}


def test_full_finetuning_grpo_under_fsdp2_updates_like_one_process_and_ddp(full_grpo_runs, tiny_model_dir):
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    one = _full(full_grpo_runs["one"], 4)
    _assert_same_full_update(start, one, _full(full_grpo_runs["ddp"], 4))
    _assert_same_full_update(start, one, _sharded(full_grpo_runs["fsdp2"], 4))


def test_fsdp2_holds_half_the_parameters_gradients_and_optimizer_state(full_grpo_runs, tiny_model_dir):
    """Each rank's own bytes (local shards), logged every step: 2 ranks of fsdp2 hold about half of
    1 process, and docs/distributed.md's formula (npu_rft.memory_plan) gives them."""
    from transformers import AutoConfig

    from npu_rft.memory_plan import ModelShape, plan_memory

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_model_dir))
    last = {name: _records(full_grpo_runs[name])[-1] for name in ("one", "ddp", "fsdp2")}
    plans = {name: plan_memory(shape, strategy="fsdp2" if name == "fsdp2" else "ddp", nproc=1 if name == "one" else 2,
                               compute_bytes=4) for name in last}
    for kind, row in (("param", "parameters"), ("grad", "gradients"), ("optimizer", "optimizer state")):
        key = f"memory/{kind}_bytes"
        assert last["one"][key] > 0
        assert last["ddp"][key] == last["one"][key]  # ddp replicates
        assert last["fsdp2"][key] <= 0.55 * last["one"][key], (kind, last["fsdp2"][key], last["one"][key])
        for name in last:  # the formula within 1% (AdamW's step counters are 4 bytes per tensor)
            assert abs(last[name][key] - plans[name].get(row)) <= 0.01 * plans[name].get(row), (name, kind)
    # the rollout's whole-model gather: every parameter once, in the compute dtype (fp32 on CPU)
    assert last["fsdp2"]["memory/gathered_bytes"] == plans["fsdp2"].get("rollout gather") == 4 * shape.params
    assert last["one"]["memory/gathered_bytes"] == 0


def test_fsdp2_resumes_after_kill_9_at_an_epoch_boundary_bit_for_bit(full_grpo_runs, monkeypatch):
    """Rank 0 is killed while finishing the step-4 checkpoint, after every rank wrote its shards: the torn
    staging directory is never picked, and the resumed run deletes it; the run resumes from step 2 (the end
    of epoch 0), trains steps 3 and 4 of epoch 1, and ends on the uninterrupted run's weights bit for bit."""
    root, config = full_grpo_runs["root"], full_grpo_runs["config"]
    killed = root / "killed"
    _torchrun(config(killed, **FSDP2), root / "killed.yaml", env={"NPU_RFT_TEST_KILL_AT_CHECKPOINT": "4"}, fails=True)
    torn = [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".step_00000004")]
    assert torn and (torn[0] / "sharded" / ".metadata").is_file()  # every shard was written, then rank 0 died
    from npu_rft.checkpoint import latest_checkpoint

    assert latest_checkpoint(killed) == checkpoint_dir(killed, 2)
    cursor = json.loads((checkpoint_dir(killed, 2) / "trainer_state.json").read_text())["cursor"]
    assert cursor == {"epoch": 0, "index": 8}  # exactly at the epoch boundary

    # resuming under another strategy or world size is refused, saying what is needed
    with pytest.raises(ValueError, match=r"parallel.strategy=fsdp2 by 2 process\(es\).*parallel.strategy: fsdp2 and 2"):
        _run_in_process(config(killed), monkeypatch, "latest")

    _torchrun(config(killed, **FSDP2), root / "resumed.yaml", "--resume")
    assert not torn[0].exists()  # the resumed run deleted it
    state = json.loads((checkpoint_dir(killed, 4) / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["cursor"] == {"epoch": 1, "index": 8}
    resumed, at_boundary = _sharded(killed, 4), _sharded(killed, 2)
    assert _max_diff(resumed, at_boundary) > 1e-4  # training went on after the boundary
    assert _max_diff(resumed, _sharded(full_grpo_runs["fsdp2"], 4)) == 0.0
    assert [r["step"] for r in _records(killed)] == [1, 2, 3, 4]


def test_merged_export_of_a_sharded_checkpoint_loads_in_transformers(full_grpo_runs, tmp_path):
    """One HF safetensors model; its log-probs are the trained model's (the 1-process run's, equal within 1e-6)."""
    import torch
    from transformers import AutoModelForCausalLM

    from npu_rft.cli import main

    out = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(checkpoint_dir(full_grpo_runs["fsdp2"], 4)), "--out", str(out),
                 "--merge"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    ids = torch.tensor([[3, 17, 42, 5, 9, 11, 2]])

    def logprobs(model_dir: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])

    trained = logprobs(checkpoint_dir(full_grpo_runs["one"], 4) / "model")
    assert float((logprobs(out) - trained).abs().max()) <= 1e-5


def test_full_finetuning_dpo_under_fsdp2_updates_like_one_process_and_ddp(tiny_model_dir, train_file, tmp_path,
                                                                         monkeypatch):
    # every pair of differing scores, one pair per micro-batch: the ranks hold different numbers of micro-batches
    sections = {"dpo": {"epochs": 2, "batches_per_iteration": 2, "beta": 0.5, "pairing": "all_pairs"}}

    def config(out: Path, **extra) -> dict:
        cfg = _full_config(tiny_model_dir, train_file, out, "dpo", **sections, **extra)
        cfg["batch"]["micro_batch_size"] = 2
        return cfg

    _run_in_process(config(tmp_path / "one"), monkeypatch)
    _torchrun(config(tmp_path / "ddp"), tmp_path / "ddp.yaml")
    _torchrun(config(tmp_path / "fsdp2", **FSDP2), tmp_path / "fsdp2.yaml")
    micro_batches = per_rank_counts((tmp_path / "fsdp2.stderr").read_text(), "micro-batches")
    assert micro_batches[0] != micro_batches[1]
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    one = _full(tmp_path / "one", 4)
    _assert_same_full_update(start, one, _full(tmp_path / "ddp", 4))
    _assert_same_full_update(start, one, _sharded(tmp_path / "fsdp2", 4))
