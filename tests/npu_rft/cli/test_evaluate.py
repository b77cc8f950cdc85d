"""Tests for ``npu-rft evaluate`` through click's CliRunner, on a tiny model, an
adapter for it, and DxBench-format rows with 3, 4 and 5 candidates."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from npu_rft.cli import cli
from npu_rft import evaluate as ev

NAMES = ["gout", "asthma", "anemia", "eczema", "migraine"]


def row(i, cands, target, dep):
    return {"system": "sys", "context": f"case {i}", "target": target,
            "meta": {"id": f"r{i}", "candidates": cands, "department": dep}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from npu_rft.quickstart import tiny_model as tm

    root = tmp_path_factory.mktemp("eval")
    spec = tm.TinyModelSpec(bpe_vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    model_dir = tm.build_tiny_model(["case one two"], NAMES, spec=spec, cache_dir=root / "cache")
    adapter_dir = root / "adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(adapter_dir)
    eval_rows = [row(0, NAMES[:3], "gout", "a"), row(1, NAMES[:4], "eczema", "a"), row(2, NAMES, "anemia", "b")]
    train_rows = [row(10 + i, NAMES[:3], t, "a") for i, t in enumerate(["anemia", "anemia", "gout"])]
    for name, rows in (("eval.jsonl", eval_rows), ("train.jsonl", train_rows)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model_dir, adapter_dir


def test_evaluate_command_compares_models_and_writes_the_report(files):
    root, model_dir, adapter_dir = files
    out = root / "out"
    result = CliRunner().invoke(cli, [
        "evaluate", "--model", str(model_dir), "--data", str(root / "eval.jsonl"), "--train", str(root / "train.jsonl"),
        "--k", "1,3", "--compare", str(adapter_dir), "--compare", str(model_dir), "--out", str(out),
        "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    name = model_dir.name
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == [name, "adapter", f"{name}#2", "keep_order", "prior", "chance"]
    # Hand: keep_order positions 0, 3, 2 (n = 3, 4, 5); prior counts anemia 2, gout 1, others 0:
    #   case 0: gout behind anemia -> p=1; case 1: eczema tied with asthma behind anemia, gout -> p in {2, 3};
    #   case 2: anemia first -> p=0.
    assert metrics["keep_order"]["metrics"]["top1"] == pytest.approx(1 / 3)
    assert metrics["keep_order"]["metrics"]["top3"] == pytest.approx(2 / 3)
    assert metrics["prior"]["metrics"]["top1"] == pytest.approx(1 / 3)
    assert metrics["prior"]["metrics"]["top3"] == pytest.approx((1 + 1 / 2 + 1) / 3)
    assert metrics["chance"]["metrics"]["top1"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 5) / 3)
    # The same model twice gives the same greedy figures.
    assert metrics[name] == metrics[f"{name}#2"]
    assert set(metrics[name]["by_department"]) == {"a", "b"}
    predictions = [json.loads(line) for line in (out / f"predictions-{name}.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["r0", "r1", "r2"]
    assert set(predictions[0]) == {"id", "sample", "completion", "parsed", "score", "reason", "target"}
    assert "| keep_order | 0.333 [" in result.output and "report written to" in result.output
    assert (out / "report.md").read_text() in result.output


def test_evaluate_command_errors_name_the_problem(files):
    root, model_dir, _ = files
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"context": "c", "target": "gout"}) + "\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", "--model", str(model_dir), "--data", str(bad), "--device", "cpu"])
    assert result.exit_code == 1 and "bad.jsonl:1" in result.output and "meta.candidates" in result.output
    result = runner.invoke(cli, ["evaluate", "--model", str(model_dir), "--data", str(bad), "--k", "0"])
    assert result.exit_code == 2 and "--k" in result.output


def test_resolve_systems_tells_adapters_from_models(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    (tmp_path / "other").mkdir()
    systems = ev.resolve_systems("base", None, [str(tmp_path / "lora"), str(tmp_path / "other"), "base"])
    assert systems == {"base": ("base", None), "lora": ("base", str(tmp_path / "lora")),
                       "other": (str(tmp_path / "other"), None), "base#2": ("base", None)}


def test_without_a_model_the_baselines_alone(files):
    root, _, _ = files
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", "--data", str(root / "eval.jsonl"), "--k", "1,3"])
    assert result.exit_code == 0, result.output
    assert [line.split(" | ")[0] for line in result.output.splitlines()[2:4]] == ["| keep_order", "| chance"]
    result = runner.invoke(cli, ["evaluate", "--data", str(root / "eval.jsonl"), "--adapter", str(root)])
    assert result.exit_code == 1 and "need --model" in result.output
