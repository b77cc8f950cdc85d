"""``npu-rft sft`` through click's CliRunner: a LoRA warm start whose adapter
starts a GRPO run as ``model.init_adapter``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from npu_rft.cli import cli

REPO = Path(__file__).resolve().parents[3]
NAMES = ["gout", "asthma", "anemia"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from npu_rft.quickstart import tiny_model as tm

    root = tmp_path_factory.mktemp("sft")
    spec = tm.TinyModelSpec(bpe_vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    model_dir = tm.build_tiny_model(["rank gout asthma anemia"], NAMES, spec=spec, cache_dir=root / "cache")
    rows = [{"context": f"rank case {i}", "target": NAMES[i % 3], "meta": {"id": f"c{i}", "candidates": NAMES}}
            for i in range(6)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "facts.jsonl").write_text("".join(json.dumps({"text": f"{n} is a disease"}) + "\n" for n in NAMES))
    return root, model_dir


def test_sft_lora_then_grpo_from_its_adapter(files):
    root, model_dir = files
    runner = CliRunner()
    result = runner.invoke(cli, [
        "sft", "--config", str(REPO / "configs/tiny/sft_lora_cpu.yaml"),
        "--set", f"model.name_or_path={model_dir}", "--set", f"data.train={root / 'train.jsonl'}",
        "--set", f"sft.text_data={root / 'facts.jsonl'}", "--set", f"run.output_dir={root / 'sft'}",
        "--set", "schedule.steps=2", "--set", "run.progress_bar=false", "--set", "run.tensorboard=false",
    ])
    assert result.exit_code == 0, result.output
    adapter = root / "sft" / "checkpoints" / "step_00000002" / "adapter"
    assert f"adapter: {adapter}" in result.output
    records = [json.loads(line) for line in (root / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["sft/chat_rows"], r["sft/text_rows"]) for r in records] == [(4.0, 4.0)] * 2

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)  # plain peft loads it

    result = runner.invoke(cli, [
        "train", "--config", str(REPO / "configs/tiny/grpo_lora_cpu.yaml"),
        "--set", f"model.name_or_path={model_dir}", "--set", f"model.init_adapter={adapter}",
        "--set", f"data.train={root / 'train.jsonl'}", "--set", f"run.output_dir={root / 'grpo'}",
        "--set", "schedule.steps=1", "--set", "run.progress_bar=false", "--set", "run.tensorboard=false",
    ])
    assert result.exit_code == 0, result.output


def test_sft_refuses_another_algorithm(files, tmp_path):
    root, model_dir = files
    result = CliRunner().invoke(cli, [
        "sft", "--config", str(REPO / "configs/tiny/grpo_lora_cpu.yaml"), "--set", f"model.name_or_path={model_dir}",
    ])
    assert result.exit_code == 1
    assert "npu-rft sft runs sft" in result.output
