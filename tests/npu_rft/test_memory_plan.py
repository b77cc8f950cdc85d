"""The per-device memory estimate (npu_rft.memory_plan) and ``npu-rft doctor --plan``.
Its parameter, gradient and optimizer figures are checked against the bytes a
run measures in test_multiprocess.py (test_fsdp2_holds_half_...)."""
from __future__ import annotations

import json

import yaml
from click.testing import CliRunner
from helpers import example_rows, tiny_train_config, write_jsonl

from npu_rft.cli import cli
from npu_rft.memory_plan import ModelShape, plan_memory


def test_qwen25_shapes_count_the_published_sizes():
    assert round(ModelShape.qwen25("7B").params / 1e9, 2) == 7.62
    assert round(ModelShape.qwen25("1.5B").params / 1e9, 2) == 1.54


def test_fsdp2_divides_the_resident_state_and_adds_the_rollout_gather():
    shape = ModelShape(params=10**9, layers=10, hidden=1000, intermediate=4000, kv_heads=2, head_dim=100)
    ddp = plan_memory(shape, strategy="ddp", nproc=8, reference=True)
    fsdp2 = plan_memory(shape, strategy="fsdp2", nproc=8, reference=True)
    offload = plan_memory(shape, strategy="fsdp2", nproc=8, reference=True, cpu_offload=True)
    # 16 bytes per parameter + 4 of DDP's buckets + 2 of the bf16 reference, replicated
    assert ddp.total() == (16 + 4 + 2) * 10**9
    # sharded 8 ways, plus the whole bf16 policy while sampling
    assert fsdp2.total() == (16 + 2) * 10**9 / 8 + 2 * 10**9
    assert offload.total() == 2 * 10**9 and offload.total("host") == (16 + 2) * 10**9 / 8
    kv = plan_memory(shape, strategy="ddp", nproc=1, rollout_tokens=1000)
    assert kv.get("KV cache") == 2 * 10 * 2 * 100 * 2 * 1000


def test_doctor_plan_prints_the_estimate_of_a_config(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", example_rows(4))
    cfg = tiny_train_config(tiny_model_dir, train, tmp_path / "run",
                            overrides={"model": {"finetune": "full", "lora": None},
                                       "parallel": {"strategy": "fsdp2"}})
    cfg["model"].pop("lora")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["doctor", "--plan", "--config", str(path), "--nproc", "2"])
    assert result.exit_code == 0, result.output
    assert "parallel.strategy=fsdp2, 2 rank(s)" in result.output
    assert "rollout gather" in result.output and "fits in 64 GB" in result.output
    missing = CliRunner().invoke(cli, ["doctor", "--plan"])
    assert missing.exit_code != 0 and "--plan needs --config" in missing.output


def test_the_plan_follows_model_dtype_as_a_run_measures_it(tiny_model_dir, tmp_path):
    """Full fine-tuning with bf16 weights: the weights, their gradients and AdamW's moments take 2 bytes
    each, in the plan and in the bytes the trainer logs; under auto they take 4."""
    from npu_rft.config import TrainConfig
    from npu_rft.config_base import from_dict
    from npu_rft.memory_plan import plan_for_config
    from npu_rft.trainer import fit

    train = write_jsonl(tmp_path / "train.jsonl", example_rows(4))
    logged = {}
    for dtype in ("auto", "bfloat16"):
        cfg = tiny_train_config(tiny_model_dir, train, tmp_path / dtype,
                                overrides={"model": {"finetune": "full", "dtype": dtype}, "schedule": {"steps": 1},
                                           "optim": {"lr": 1e-3}})
        cfg["model"].pop("lora")
        config = from_dict(TrainConfig, cfg)
        fit(config)
        record = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()][-1]
        plan = plan_for_config(config, nproc=1)
        for kind, row in (("param", "parameters"), ("grad", "gradients"), ("optimizer", "optimizer state")):
            measured = record[f"memory/{kind}_bytes"]
            assert measured > 0
            # within 1%: AdamW's step counters are one 4-byte scalar per tensor
            assert abs(measured - plan.get(row)) <= 0.01 * plan.get(row), (dtype, kind, measured, plan.get(row))
        logged[dtype] = record
    for kind in ("param", "grad"):
        assert logged["bfloat16"][f"memory/{kind}_bytes"] * 2 == logged["auto"][f"memory/{kind}_bytes"]
